"""Projection onto the dual cone of the rows of ``J``, expressed on weights through ``G = J J^T``.

The dual cone of the rows ``g_1..g_m`` is ``{d : J d >= 0}`` (the directions that conflict with
no task). Quinton and Rey, "Jacobian Descent for Multi-Objective Optimization" (2024),
Proposition 1: the projection of ``J^T u`` onto it is ``J^T v`` with ``v`` solving

    minimise  v^T G v   subject to  v >= u,

so it needs only the Gramian. With ``v = u + x`` this is the bound-constrained QP
``min 1/2 x^T G x + (G u)^T x`` over ``x >= 0``, solved exactly by
:func:`mtlopt.solvers.min_norm.nonnegative_qp` (face enumeration for few tasks, an interior
point otherwise; batched: UPGrad projects ``m`` vectors at once).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .host_linalg import reads_back
from .min_norm import nonnegative_qp

#: Ridge added to the max-diagonal-normalised Gramian. When ``G`` is singular with a
#: non-negative null vector (zero rows, opposite rows) the minimisers form an unbounded set and
#: the interior point would drift along it; the ridge picks the least-norm one, while moving a
#: well-posed solution by about ``1e-13 cond(G)`` relative. (It does not replace ``reg_eps``:
#: a Gramian accumulated in float32 can be indefinite by far more than this.)
RIDGE = 1e-13


def dual_cone_weights(gramian: Tensor, u: Tensor) -> Tensor:
    """``v = argmin_{v >= u} v^T G v`` for one ``u`` (``[m]``) or a batch (``[b, m]``, one per row).

    Float64 on ``G``'s device, no host synchronisation. ``J^T v`` is the projection of
    ``J^T u`` onto the dual cone of the rows of ``J`` (so ``J J^T v = G v >= 0``).
    The problem is invariant to the scale of ``G`` and linear in the scale of ``u``, so both
    are normalised before solving. A zero ``G`` gives ``v = max(u, 0)`` (the least-norm
    minimiser).
    """
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(f"gramian: expected a square matrix, got shape {tuple(gramian.shape)}")
    if u.shape[-1] != gramian.shape[0] or u.dim() not in (1, 2):
        raise ValueError(
            f"u: expected shape [{gramian.shape[0]}] or [b, {gramian.shape[0]}], "
            f"got {tuple(u.shape)}"
        )
    gramian = gramian.to(torch.float64)
    u = u.to(device=gramian.device, dtype=torch.float64)
    squeeze = u.dim() == 1
    rows = u.unsqueeze(0) if squeeze else u
    m = gramian.shape[0]
    largest = gramian.diagonal().amax()
    if reads_back(gramian):  # the test read back (free there): fewer operations
        top = float(largest)
        if top <= 0:
            v = rows.clamp(min=0)
            return v.squeeze(0) if squeeze else v
        quadratic = gramian / top
        quadratic.diagonal().add_(RIDGE)
        zero_gramian = None
    else:
        zero_gramian = largest <= 0
        eye = torch.eye(m, dtype=torch.float64, device=gramian.device)
        quadratic = gramian / torch.where(zero_gramian, 1.0, largest) + RIDGE * eye
    scale = rows.abs().amax(-1, keepdim=True)
    scale = torch.where(scale > 0, scale, 1.0)
    unit_rows = rows / scale
    shift = nonnegative_qp(quadratic, unit_rows @ quadratic)
    v = rows + shift * scale  # adding a non-negative shift keeps v >= u exactly
    if zero_gramian is not None:
        v = torch.where(zero_gramian, rows.clamp(min=0), v)
    return v.squeeze(0) if squeeze else v
