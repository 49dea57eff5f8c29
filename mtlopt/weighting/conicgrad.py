"""ConicGrad: the best worst-task update inside a cone around the mean gradient."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..solvers.conic import conic_direction
from .base import Weighting, check_unit_interval


def conicgrad_weights(gramian: Tensor, cos: float) -> Tensor:
    """ConicGrad's task weights ``||g0|| x / t`` (see :class:`ConicGrad`), zero if ``t* = 0``."""
    norms_sq = gramian.diagonal().clamp(min=0)
    # A zero gradient (here: 1e-100 times the largest or less) caps t* at 0.
    active = norms_sq > norms_sq.amax() * 1e-200
    # t* <= the smallest gradient norm: that is the scale the dual problem is solved in.
    smallest = torch.where(active, norms_sq, torch.inf).amin()
    normalised = gramian / torch.where(active.all(), smallest, torch.ones_like(smallest))
    normalised = 0.5 * (normalised + normalised.T)
    coefficients, length, g0_norm = conic_direction(normalised, cos)
    # Certificate: at the optimum every task improves by g_i^T d_q >= t^2. Below half of it
    # the "direction" is round-off around t* = 0 (nothing in the cone helps every task).
    worst = (normalised @ coefficients).amin()
    real = active.all() & (worst >= 0.5 * length**2) & (length**2 > 1e-30)
    scale = g0_norm / torch.where(real, length, torch.ones_like(length))
    return torch.where(real, scale * coefficients, torch.zeros_like(coefficients))


class ConicGrad(Weighting):
    r"""ConicGrad: maximise the worst task improvement within a cone around the mean gradient.

    Hassanpour, Janjua, Zhang, Lavasani, Zhang, Zhou and Gao, "Fantastic Multi-Task Gradient
    Updates and How to Find Them In a Cone" (ConicGrad), arXiv:2502.00217, 2025.

    The paper's problem, with ``g0 = (1/m) sum_i g_i`` and the cone
    ``C = {d : g0^T d >= c ||g0|| ||d||}`` of half-angle ``arccos(c)`` around it::

        max_d  min_i g_i^T d   subject to  d in C

    It is positively homogeneous in ``d``; the paper separates direction from magnitude by
    normalising ``d``. No code was published; mtlopt solves the problem exactly with the
    following derivation of its own (``s = sqrt(1 - c^2)``, ``g_w = J^T w``,
    ``u = g0 / ||g0||``).

    1. Direction: ``t* = max { min_i g_i^T d : d in C, ||d|| <= 1 }`` with maximiser ``d*``.
       By homogeneity, ``max_{d in C} min_i g_i^T d - ||d||^2 / 2`` is attained at
       ``d_q = t* d*`` with value ``t*^2 / 2``.
    2. ``min_i g_i^T d = min_{w in simplex} g_w^T d``; concave in ``d``, linear in ``w`` over a
       compact set, so max and min swap (Sion):
       ``t*^2 / 2 = min_w max_{d in C} (g_w^T d - ||d||^2 / 2)``.
    3. The inner maximum has a closed form: it is ``d(w) = P_C(g_w)``, the projection onto
       ``C``. Through the Lagrangian with the squared cone constraint,
       ``((1 + mu c^2 ||g0||^2) I - mu g0 g0^T) d = g_w``, and Sherman-Morrison-Woodbury inverts
       the rank-one update: ``d = (g_w + kappa g0) / alpha``, ``alpha = 1 + mu c^2 ||g0||^2``,
       ``kappa = mu g0^T g_w / (1 - mu s^2 ||g0||^2)``. Complementary slackness fixes ``mu``:
       with ``a = u^T g_w`` and ``b = ||g_w - a u||``, ``d = g_w`` if ``a >= c ||g_w||``
       (``mu = 0``), ``d = 0`` in the polar cone (``-a >= s ||g_w||``), and otherwise the
       boundary ray ``d = (c a + s b) (c u + s (g_w - a u) / b)``. The inner value is
       ``||P_C(g_w)||^2 / 2``.
    4. The dual ``w* = argmin_{w in simplex} ||P_C(g_w)||^2 / 2`` is convex and continuously
       differentiable; it is solved from the Gramian by :mod:`mtlopt.solvers.conic` (a fixed
       number of interior-point iterations). Then ``d_q = P_C(g_w*)`` (unique: the min-norm
       point of ``conv{g_i} + C*``), ``t* = ||d_q||`` and ``d* = d_q / t*``. Its optimality
       conditions give ``g_i^T d_q >= t*^2`` for every task: the update never conflicts.
    5. Rescaling: the update is ``d = ||g0|| d*``, the direction of the cone problem with the
       magnitude of the plain mean-gradient step (mtlopt's reading of the paper's
       normalisation). With ``J^T x = d_q`` the task weights are ``w = ||g0|| x / t*``.

    Degenerate cases: if ``t* = 0`` no direction in the cone improves every task (a zero task
    gradient, i.e. one at most ``1e-100`` times the largest; two opposite ones; ``c = 1``
    with a task opposed to ``g0``) and the update is zero, as MGDA's is at a Pareto-stationary
    point. This is decided by the certificate ``min_i g_i^T d_q >= t^2 / 2`` on the computed
    ``d_q``, so the returned update is non-conflicting whatever the solver's accuracy.
    ``g0 = 0``: zero update.

    Numerics: ``t*`` is at most the smallest gradient norm, so the Gramian is divided by the
    smallest squared norm before solving, and the solver starts from weights proportional to
    ``1 / ||g_i||``; gradient norms spanning 16 orders of magnitude are solved to round-off
    (tested). Order-free; the direction is scale-free and the update scales with ``J``. Task
    heads receive their own gradient. Cost: 25 interior-point iterations of ``m x m`` solves
    per step (about 15 ms on one CPU core for a handful of tasks).

    Args:
        c: cosine of the cone's half-angle, in [0, 1] (0.5: 60 degrees). ``c = 1`` restricts
            the update to the direction of ``g0``; ``c = 0`` to the half-space
            ``g0^T d >= 0``.
    """

    needs = "gramian"
    solves_on_host = True

    def __init__(self, c: float = 0.5) -> None:
        super().__init__()
        self.c = check_unit_interval("c", c)

    def hyperparameters(self) -> dict[str, Any]:
        return {"c": self.c}

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        return conicgrad_weights(gramian, self.c)
