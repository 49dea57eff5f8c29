"""ConFIG: a conflict-free update with equal cosines to the normalised task gradients."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..solvers import gramian_rtol, pinv_solve
from .base import Weighting


def config_weights(gramian: Tensor, preference: Tensor, rtol: float) -> Tensor:
    """ConFIG's task weights from the Gramian (see :class:`ConFIG` for the derivation)."""
    norms = gramian.diagonal().clamp(min=0).sqrt()
    active = norms > norms.amax() * 1e-150  # exact zeros (and denormal dust) have no direction
    safe = torch.where(active, norms, torch.ones_like(norms))
    cosines = gramian / torch.outer(safe, safe)
    cosines = torch.where(torch.outer(active, active), cosines, torch.zeros_like(cosines))
    target = torch.where(active, preference, torch.zeros_like(preference))
    solution = pinv_solve(cosines, target, rtol)  # y = K^+ p
    projected = cosines @ solution  # K y: the cosines of the unit rows with g_u, times ||g_u||
    unit_norm_sq = solution @ projected  # ||g_u||^2 = y^T K y
    length = norms @ projected  # sum_i g_i^T g_u
    # p orthogonal to the range of K (e.g. two opposite gradients): no direction, no update.
    floor = 1e-20 * (target @ target) / cosines.trace().clamp(min=1.0)
    degenerate = unit_norm_sq <= floor
    factor = length / torch.where(degenerate, torch.ones_like(unit_norm_sq), unit_norm_sq)
    weights = torch.where(active, solution / safe, torch.zeros_like(solution)) * factor
    return torch.where(degenerate, torch.zeros_like(weights), weights)


class ConFIG(Weighting):
    r"""ConFIG: the update whose cosine with every normalised task gradient is equal.

    Liu, Chu, Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural
    Networks", ICLR 2025 (Eq. 2, with its projection-length rescaling).

    With the unit rows ``U = [g_1 / ||g_1||; ...; g_m / ||g_m||]``, the direction is
    ``g_u = U^+ p`` (``p = 1`` by default, the paper's equal weighting) and the update is
    ``d = (sum_i g_i^T g_u / ||g_u||) g_u / ||g_u||``. When ``U`` has full row rank,
    ``U g_u = p > 0``, so every task improves (conflict-free).

    Gramian form (exact, no Jacobian needed): with ``D = diag(||g_i||)``, ``U = D^-1 J`` and the
    cosine matrix ``K = U U^T = D^-1 G D^-1``, ``U^+ p = U^T (U U^T)^+ p = J^T D^-1 K^+ p``.
    So with ``y = K^+ p``: ``g_u = J^T D^-1 y``, ``||g_u||^2 = y^T K y`` and
    ``sum_i g_i^T g_u = ||g||^T K y``; the task weights are
    ``w = D^-1 y (||g||^T K y) / (y^T K y)``, and ``d = w^T J``.

    Conventions:
        * The pseudo-inverse drops eigenvalues of ``K`` at or below ``10 m eps_float32`` of the
          largest (the library-wide cut-off for Gramians of float32 gradients). The reference
          code (the authors' ``conflictfree`` package, torchjd) solves with ``lstsq`` or
          ``pinv`` on the ``m x n`` matrix ``U``, whose default cut-off (``max(m, n) eps``)
          grows with the parameter count; ``use_least_square`` picks between those two in
          the reference, and both give the same minimum-norm least-squares solution that
          the Gramian form computes, so it is accepted for compatibility and changes nothing.
        * A zero gradient has no direction: its unit row is zero (as the reference's
          ``nan_to_num``), it gets weight 0. If ``p`` is orthogonal to the range of ``K``
          (e.g. two exactly opposite gradients and nothing else) ``g_u = 0`` and the update is
          zero, as in torchjd.
        * The length is the sum of the projections (the reference's default
          ``ProjectionLength``), not the mean.

    Order-free with the default preference. Task heads receive their own gradient.

    Args:
        pref_vector: positive per-task preferences ``p`` (None: all ones).
        use_least_square: the reference's choice of solver (see above); no effect here.
    """

    needs = "gramian"
    solves_on_host = True

    def __init__(
        self, pref_vector: Sequence[float] | None = None, use_least_square: bool = True
    ) -> None:
        super().__init__()
        self.pref_vector = None if pref_vector is None else _check_preferences(pref_vector)
        if not isinstance(use_least_square, bool):
            raise TypeError(
                f"use_least_square: expected a bool, got {type(use_least_square).__name__}"
            )
        self.use_least_square = use_least_square
        self._on_device: dict[torch.device, Tensor] = {}

    def hyperparameters(self) -> dict[str, Any]:
        pref = None if self.pref_vector is None else list(self.pref_vector)
        return {"pref_vector": pref, "use_least_square": self.use_least_square}

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        m = gramian.shape[0]
        if self.pref_vector is None:
            preference = torch.ones(m, dtype=gramian.dtype, device=gramian.device)
        elif len(self.pref_vector) != m:
            raise ValueError(
                f"pref_vector: ConFIG was given {len(self.pref_vector)} preferences, "
                f"but the step has {m} losses"
            )
        else:
            preference = self._on_device.get(gramian.device)
            if preference is None:  # one host-to-device copy per device, not per step
                preference = torch.tensor(
                    self.pref_vector, dtype=torch.float64, device=gramian.device
                )
                self._on_device[gramian.device] = preference
        return config_weights(gramian, preference, gramian_rtol(torch.float32, m))


def _check_preferences(values: Sequence[float]) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        if isinstance(values, Tensor):
            values = values.tolist()  # construction time only
        else:
            raise TypeError(
                f"pref_vector: expected a sequence of positive numbers, got {type(values).__name__}"
            )
    result = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"pref_vector: expected positive numbers, got {value!r}")
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"pref_vector: expected positive finite numbers, got {value!r}")
        result.append(float(value))
    if not result:
        raise ValueError("pref_vector: expected at least one preference, got none")
    return tuple(result)
