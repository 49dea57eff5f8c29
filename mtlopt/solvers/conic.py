"""ConicGrad's dual: ``min_{w in simplex} 1/2 ||P_C(J^T w)||^2``, from the Gramian alone.

``C = {d : g0^T d >= c ||g0|| ||d||}`` is the cone of half-angle ``arccos(c)`` around the mean
gradient ``g0 = J^T 1 / m`` and ``P_C`` the Euclidean projection onto it. At the optimum
``w*``, ``P_C(J^T w*)`` is ConicGrad's direction scaled by the optimal worst-task improvement
(the derivation is in :class:`mtlopt.weighting.ConicGrad`). Everything is written with
coefficients: a vector ``J^T x`` is represented by ``x``, and inner products come from ``G``.

Method: a primal-dual interior point on ``w >= 0``, ``1^T w = 1`` for a fixed number of
iterations. ``f(w) = 1/2 ||P_C(J^T w)||^2`` is convex and continuously differentiable, and
smooth inside each of its three regions (``J^T w`` inside ``C``, inside the polar cone, in
between), where its Hessian is written in closed form. Each iteration aims at the
central-path point ``w_i s_i = target`` (``target`` shrinking superlinearly with the gap);
the primal step minimises ``f(w) - target sum log w`` to second order with the primal-dual
barrier Hessian ``S / W`` (a descent direction of that barrier) and is backtracked on it,
in one batched evaluation, from the largest step keeping ``w > 0``; the slacks take the
matching Newton step, kept within a wide band around the central path (as IPOPT does).
It starts from weights proportional to ``1 / ||g_i||`` (the worst task tends to be a small
gradient) and reaches round-off within 20 iterations on 300 random problems, gradient norms
spanning up to 16 orders of magnitude included. Every branch is a ``torch.where`` (no host
synchronisation); float64 on the Gramian's device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..nosync import at

#: Interior-point iterations.
ITERATIONS = 25
#: Step sizes tried per line search: 1, 1/2, 1/4, ... of the largest step keeping ``w > 0``.
LINE_SEARCH_TRIALS = 40
#: The central-path target is ``gap * min(0.1, GAP_FACTOR * gap)``, floored at ``MU_FLOOR``
#: (ConicGrad normalises the Gramian to a smallest diagonal entry of 1, so ``f* <= 1/2``).
GAP_FACTOR = 10.0
MU_FLOOR = 1e-24
#: Below this ``||g0||`` (in the Gramian's normalised units) the cone has no axis.
AXIS_FLOOR = 1e-12


class Cone:
    """The cone around ``g0``, seen through a normalised Gramian (coefficient form)."""

    def __init__(self, gramian: Tensor, cos: float) -> None:
        m = gramian.shape[0]
        ones = torch.ones(m, dtype=gramian.dtype, device=gramian.device)
        mean_products = gramian @ ones / m  # J g0
        g0_norm = (mean_products.sum() / m).clamp(min=0).sqrt()
        self.gramian = gramian
        self.has_axis = g0_norm > AXIS_FLOOR  # without an axis, the cone is everything
        safe = torch.where(self.has_axis, g0_norm, torch.ones_like(g0_norm))
        self.g0_norm = g0_norm
        self.axis = ones / (m * safe)  # u = J^T axis = g0 / ||g0||
        self.axis_products = mean_products / safe  # J u
        self.cos = cos
        self.sin = max(1.0 - cos * cos, 0.0) ** 0.5

    def values(self, weights: Tensor) -> Tensor:
        """``f(w)`` for each row of ``weights``.

        With ``v = J^T w``, ``a = u^T v``, ``b = ||v - a u||``: ``||P_C(v)|| = ||v||`` inside
        ``C`` (``a >= c ||v||``) and ``max(0, c a + s b)`` outside.
        """
        norm_sq = ((weights @ self.gramian) * weights).sum(-1).clamp(min=0)
        along = weights @ self.axis_products
        across = (norm_sq - along**2).clamp(min=0).sqrt()
        level = (self.cos * along + self.sin * across).clamp(min=0)
        inside = ((along >= 0) & (along**2 >= self.cos**2 * norm_sq)) | ~self.has_axis
        return 0.5 * torch.where(inside, norm_sq, level**2)

    def project(self, weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """At one point ``w``: ``x`` with ``J^T x = P_C(J^T w)``, ``f(w)`` and its Hessian.

        ``P_C(v)`` is ``v`` inside ``C``, 0 in the polar cone (``-a >= s ||v||``) and
        ``(c a + s b) n`` in between, ``n = c u + s e`` the unit vector of the cone's boundary
        in the plane of ``u`` and ``v`` (``e = (v - a u) / b``). There ``f = (c a + s b)^2 / 2``
        with gradient ``(c a + s b) J n`` and Hessian
        ``J n n^T J^T + (s (c a + s b) / b) (G - J u u^T J^T - J e e^T J^T)``; inside ``C`` the
        Hessian is ``G``, in the polar cone 0.
        """
        c, s = self.cos, self.sin
        gramian, k = self.gramian, self.axis_products
        products = gramian @ weights
        norm_sq = (products @ weights).clamp(min=0)
        along = k @ weights
        across = (norm_sq - along**2).clamp(min=0).sqrt()
        level = c * along + s * across
        inside = ((along >= 0) & (along**2 >= c * c * norm_sq)) | ~self.has_axis
        middle = ~inside & (level > 0)
        safe_across = torch.where(across > 0, across, torch.ones_like(across))
        rim = level * (c * self.axis + s * (weights - along * self.axis) / safe_across)
        zeros = torch.zeros_like(weights)
        coefficients = torch.where(inside, weights, torch.where(middle, rim, zeros))
        value = 0.5 * torch.where(inside, norm_sq, level.clamp(min=0) ** 2)
        across_products = (products - along * k) / safe_across  # J e
        normal_products = c * k + s * across_products  # J n
        curvature = s * level.clamp(min=0) / safe_across
        rim_hessian = torch.outer(normal_products, normal_products) + curvature * (
            gramian - torch.outer(k, k) - torch.outer(across_products, across_products)
        )
        hessian = torch.where(inside, gramian, torch.where(middle, rim_hessian, 0.0 * gramian))
        return coefficients, value, hessian


def _newton_direction(hessian: Tensor, gradient: Tensor, ridge: Tensor) -> Tensor:
    """The step ``dw`` with ``H dw + nu 1 = -gradient`` and ``1^T dw = 0``.

    ``H`` (positive definite with the barrier term) is equilibrated to unit diagonal first:
    the barrier terms span many orders of magnitude near the solution.
    """
    scale = hessian.diagonal().clamp(min=1e-300).rsqrt()
    balanced = hessian * scale.unsqueeze(0) * scale.unsqueeze(1) + ridge
    solved, _ = torch.linalg.solve_ex(balanced, torch.stack([scale * gradient, scale], dim=-1))
    h_gradient = scale * solved[:, 0]
    h_ones = scale * solved[:, 1]
    nu = -h_gradient.sum() / h_ones.sum().clamp(min=1e-300)
    return -(h_gradient + nu * h_ones)


def _max_step(values: Tensor, steps: Tensor) -> Tensor:
    """0.995 times the largest ``alpha`` in [0, 1] with ``values + alpha * steps >= 0``."""
    ratios = torch.where(steps < 0, -values / torch.where(steps < 0, steps, -1.0), 2.0)
    return (0.995 * ratios.amin()).clamp(max=1.0)


def solve_dual(cone: Cone) -> Tensor:
    """The dual optimum ``w*`` (on the simplex) of ``min_w 1/2 ||P_C(J^T w)||^2``."""
    gramian = cone.gramian
    m = gramian.shape[0]
    dtype, device = gramian.dtype, gramian.device
    # Start where small gradients weigh more (the worst task tends to have one): 1 / ||g_i||.
    inverse_norms = gramian.diagonal().clamp(min=1e-300).rsqrt()
    weights = inverse_norms / inverse_norms.sum()
    slacks = torch.ones(m, dtype=dtype, device=device)
    trials = 0.5 ** torch.arange(LINE_SEARCH_TRIALS, dtype=dtype, device=device)
    ridge = 1e-15 * torch.eye(m, dtype=dtype, device=device)
    for _ in range(ITERATIONS):
        coefficients, value, hessian = cone.project(weights)
        gap = (weights * slacks).mean()
        target = (gap * (GAP_FACTOR * gap).clamp(max=0.1)).clamp(min=MU_FLOOR)
        gradient = gramian @ coefficients - target / weights  # of the barrier
        step = _newton_direction(hessian + torch.diag(slacks / weights), gradient, ridge)
        slope = gradient @ step
        sizes = _max_step(weights, step) * trials
        candidates = (weights + sizes.unsqueeze(-1) * step).clamp(min=1e-300)
        barrier = value - target * weights.log().sum()
        tried = cone.values(candidates) - target * candidates.log().sum(-1)
        accepted = (tried <= barrier + 1e-4 * sizes * slope) & torch.isfinite(tried)
        best = at(candidates, torch.where(accepted, trials, 0.0).argmax())  # largest accepted
        moved = accepted.any() & (slope < 0)
        new_weights = torch.where(moved, best / best.sum(), weights)
        slack_step = target / weights - slacks - slacks / weights * step
        slacks = slacks + _max_step(slacks, slack_step) * slack_step
        slacks = torch.minimum(
            torch.maximum(slacks, target / (1e10 * new_weights)), 1e10 * target / new_weights
        )
        weights = new_weights
    return weights


def conic_direction(gramian: Tensor, cos: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(x, t, ||g0||)`` for a normalised PSD Gramian and the cone ``c = cos``.

    ``J^T x = P_C(J^T w*)``; ``t = ||J^T x||`` is the optimal worst-task improvement
    ``max_{d in C, ||d|| <= 1} min_i g_i^T d`` and ``J^T x / t`` the unit direction attaining
    it (when ``t > 0``).
    """
    cone = Cone(gramian, cos)
    coefficients, _, _ = cone.project(solve_dual(cone))
    length = (coefficients @ gramian @ coefficients).clamp(min=0).sqrt()
    return coefficients, length, cone.g0_norm
