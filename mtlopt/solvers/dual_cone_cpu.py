"""UPGrad's and DualProj's projections on the CPU in a few tensor operations.

The general path conditions the Gramian (``G / trace + reg_eps I``), normalises it again for
:func:`mtlopt.solvers.dual_cone.dual_cone_weights` (largest diagonal, ridge), scales each
``u`` and runs block principal pivoting from the face ``{j : c_j < 0}``: about 60 small
tensor operations for UPGrad at m = 10, which cost several times their warm price right after
a backward pass has evicted the caches torch's dispatch relies on. Here the two
normalisations are one scaling of ``G`` (their scalars read back from its diagonal), every
problem's first face is solved in one batched LU, and the pivoting's own optimality test
(``x >= 0`` on the face, a non-negative slope ``(Q x + c)_j`` off it, same tolerance) runs
on the host on one read of the result: about 20 operations. On the benchmark MLP's
representation (m = 10) that face was optimal in every one of 2000 problems (for independent
random gradients at m = 10, in about half the cases); where one is not, the pivoting goes on
from that face. UPGrad's weights at m = 10: 0.14 -> 0.10 ms warm, and in representation
mode a step 1.51-1.53x -> 1.48-1.49x plain (the harness, UPGrad against MGDA and CAGrad);
where problems need more faces, about as before (0.21 ms against 0.22).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .dual_cone import RIDGE
from .min_norm import PIVOT_TOLERANCE, _face_solution, _pivoted


def preference_projections_on_cpu(
    gramian: Tensor, preference: list[float], each_task: bool, norm_eps: float, reg_eps: float
) -> list[float] | None:
    """UPGrad's weights (``each_task``: ``sum_i v_i`` with ``u_i = p_i e_i``) or DualProj's
    (``v`` with ``u = p``), ``v = argmin_{v >= u} v^T Q v`` and ``Q`` their conditioned Gramian
    ``G / trace(G) + reg_eps I``; None for a Gramian whose trace is below ``norm_eps`` or not
    finite (the caller's general path handles those)."""
    gramian = gramian.to(torch.float64)
    diagonal = gramian.diagonal().tolist()
    trace = sum(diagonal)
    if not (trace >= norm_eps and trace > 0.0 and trace < math.inf):
        return None  # a zero-like or non-finite Gramian: the general path's special cases
    # Q = (G / trace + reg_eps I) / top + RIDGE I, top its largest diagonal entry.
    top = max(diagonal) / trace + reg_eps
    quadratic = (gramian + gramian.mT).mul_(0.5 / (trace * top))  # symmetric, as the QP's
    quadratic.diagonal().add_(reg_eps / top + RIDGE)
    if each_task:  # u_i / |u_i|_max = sign(p_i) e_i, so c_i = sign(p_i) Q_i
        scales = [abs(p) for p in preference]
        signs = [1.0 if p > 0.0 else -1.0 if p < 0.0 else 0.0 for p in preference]
        if all(sign == 1.0 for sign in signs):
            linear = quadratic
        else:
            linear = quadratic * torch.tensor(signs, dtype=torch.float64).unsqueeze(-1)
    else:
        scales = [max(map(abs, preference)) or 1.0]
        unit = [p / scales[0] for p in preference]
        linear = torch.tensor([unit], dtype=torch.float64) @ quadratic
    shifts, first_face = _first_faces(quadratic, linear)
    if shifts is None:  # some optimum lies on another face: pivot on from this one
        shifts = _pivoted(quadratic, linear, False, first_face).tolist()
    # v = u + scale x, summed over the problems.
    weights = list(preference)
    for scale, shift in zip(scales, shifts):
        for j, x_j in enumerate(shift):
            if x_j:
                weights[j] += scale * x_j
    return weights


def _first_faces(quadratic: Tensor, linear: Tensor) -> tuple[list[list[float]] | None, Tensor]:
    """``min 1/2 x^T Q x + c^T x`` over ``x >= 0`` for each row ``c`` of ``linear``, when
    the minimiser lies on the face ``{j : c_j < 0}`` (solved by
    :func:`mtlopt.solvers.min_norm._face_solution`, tested as
    :func:`mtlopt.solvers.min_norm._principal_pivoting` tests, on the host), else None; and
    the solutions on that face."""
    x = _face_solution(quadratic, linear, linear < 0, False)
    slope = torch.addmm(linear, x, quadratic)
    x_rows, slope_rows, c_rows = torch.stack([x, slope, linear]).tolist()
    shifts = []
    for x_row, slope_row, c_row in zip(x_rows, slope_rows, c_rows):
        limit = PIVOT_TOLERANCE * (1.0 + max(map(abs, c_row))) * (1.0 + max(map(abs, x_row)))
        if not limit < math.inf:  # a non-finite value ("max" may skip a nan: checked below)
            return None, x
        for x_j, slope_j, c_j in zip(x_row, slope_row, c_row):
            # "not >=" also rejects nan; c_j < 0 is the face
            if not (x_j if c_j < 0.0 else slope_j) >= -limit or math.isnan(c_j):
                return None, x
        shifts.append([x_j if x_j > 0.0 else 0.0 for x_j in x_row])  # noqa: FURB136 (faster)
    return shifts, x
