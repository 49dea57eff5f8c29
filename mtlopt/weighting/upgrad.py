"""UPGrad: the mean of every task gradient projected onto the dual cone of all of them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..solvers import min_norm
from ..solvers.dual_cone import dual_cone_weights
from ..solvers.dual_cone_cpu import preference_projections_on_cpu
from ..solvers.host_linalg import on_host, reads_back
from .base import Weighting


def check_non_negative(name: str, value: float) -> float:
    """Validate a finite hyperparameter ``>= 0`` and return it as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a non-negative number, got {type(value).__name__}")
    if not (0.0 <= value < float("inf")):
        raise ValueError(f"{name}: expected a non-negative finite number, got {value!r}")
    return float(value)


def check_pref_vector(pref_vector: Tensor | Sequence[float] | None) -> tuple[float, ...] | None:
    """A preference vector as a tuple of finite floats (plain values for the checkpoint)."""
    if pref_vector is None:
        return None
    if isinstance(pref_vector, Tensor):
        if pref_vector.dim() != 1:
            raise ValueError(
                f"pref_vector: expected a vector (1-D), got shape {tuple(pref_vector.shape)}"
            )
        values = tuple(float(v) for v in pref_vector.detach().cpu().tolist())
    else:
        try:
            values = tuple(float(v) for v in pref_vector)
        except (TypeError, ValueError):
            raise TypeError(
                f"pref_vector: expected None, a 1-D tensor or a sequence of numbers, "
                f"got {pref_vector!r}"
            ) from None
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(
            f"pref_vector: expected a non-empty vector of finite numbers, got {values}"
        )
    return values


def normalized_gramian(gramian: Tensor, norm_eps: float, reg_eps: float) -> Tensor:
    """torchjd's conditioning: ``G / trace(G)`` (zero if ``trace < norm_eps``) ``+ reg_eps I``."""
    trace = gramian.diagonal().sum()
    if reads_back(gramian):  # the test read back (free there): 5 operations, not 12
        value = float(trace)
        small_trace = value < norm_eps or value <= 0
        scaled = torch.zeros_like(gramian) if small_trace else gramian / value
        scaled.diagonal().add_(reg_eps)
        return scaled
    small = (trace < norm_eps) | (trace <= 0)
    scaled = torch.where(small, torch.zeros_like(gramian), gramian / torch.where(small, 1.0, trace))
    eye = torch.eye(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)
    return scaled + reg_eps * eye


class _PreferenceProjection(Weighting):
    """What UPGrad and DualProj share: the hyperparameters and the preference weights."""

    needs = "gramian"

    def __init__(
        self,
        pref_vector: Tensor | Sequence[float] | None = None,
        norm_eps: float = 1e-4,
        reg_eps: float = 1e-4,
    ) -> None:
        super().__init__()
        self.pref_vector = check_pref_vector(pref_vector)
        self.norm_eps = check_non_negative("norm_eps", norm_eps)
        self.reg_eps = check_non_negative("reg_eps", reg_eps)
        # The preference tensor per device: copying it from the host every step would
        # synchronise with an accelerator.
        self._pref_cache: dict[torch.device, Tensor] = {}

    def hyperparameters(self) -> dict[str, Any]:
        pref = None if self.pref_vector is None else list(self.pref_vector)
        return {"pref_vector": pref, "norm_eps": self.norm_eps, "reg_eps": self.reg_eps}

    def preference_values(self, m: int) -> list[float]:
        """The preference weights for ``m`` tasks (``1/m`` each by default), as floats."""
        if self.pref_vector is None:
            return [1.0 / m] * m
        if len(self.pref_vector) != m:
            raise ValueError(
                f"pref_vector: has {len(self.pref_vector)} entries, but there are {m} tasks"
            )
        return list(self.pref_vector)

    def preference(self, gramian: Tensor) -> Tensor:
        """The preference weights for ``m`` tasks (``1/m`` each by default), on ``G``'s device."""
        m = gramian.shape[0]
        if self.pref_vector is None:
            return torch.full((m,), 1.0 / m, dtype=torch.float64, device=gramian.device)
        self.preference_values(m)  # the length check
        cached = self._pref_cache.get(gramian.device)
        if cached is None:
            cached = torch.tensor(self.pref_vector, dtype=torch.float64).to(gramian.device)
            self._pref_cache[gramian.device] = cached
        return cached

    def conditioned_gramian(self, gramian: Tensor) -> Tensor:
        return normalized_gramian(gramian, self.norm_eps, self.reg_eps)

    def weights_on_cpu(self, gramian: Tensor, each_task: bool) -> Tensor | None:
        """The weights in few operations on the CPU (:mod:`mtlopt.solvers.dual_cone_cpu`);
        None where the general path must run (another device, or the shortcut declined)."""
        if not (min_norm.PIVOT_ON_CPU and on_host(gramian)):
            return None  # off the CPU, or past 16 tasks: the batched tensor code is faster
        preference = self.preference_values(gramian.shape[0])
        weights = preference_projections_on_cpu(
            gramian, preference, each_task, self.norm_eps, self.reg_eps
        )
        return None if weights is None else torch.tensor(weights, dtype=torch.float64)


class UPGrad(_PreferenceProjection):
    r"""UPGrad: project each task gradient onto the dual cone of all of them, then combine.

    Quinton and Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv 2406.16232
    (2024); conventions of their library torchjd (0.18). With ``pi_J`` the projection onto the
    dual cone ``{d : J d >= 0}`` of the rows of ``J``, the update is::

        d = sum_i p_i pi_J(g_i)           (p = pref_vector, default 1/m: the paper's mean)

    By their Proposition 1, ``pi_J(J^T u) = J^T v`` with ``v = argmin_{v >= u} v^T G v``, so with
    ``u = p_i e_i`` for every ``i`` (one batched solve,
    :func:`mtlopt.solvers.dual_cone.dual_cone_weights`) the weights are ``w = sum_i v_i``.

    Conditioning as in torchjd: the QP uses ``G / trace(G) + reg_eps I`` (``trace(G)`` is the
    squared Frobenius norm of ``J``); if ``trace(G) < norm_eps`` the normalised Gramian is
    taken as zero, so a group whose gradients are all that small gets ``w = max(p, 0)``
    (the preference-weighted mean). That threshold is torchjd's and is not scale-free: pass
    ``norm_eps=0`` to normalise any non-zero Gramian. ``reg_eps`` makes the QP strictly convex;
    the optimality conditions then give ``g_i . d >= -reg_eps trace(G) w_i`` rather than
    ``>= 0`` (torchjd's behaviour too; ``reg_eps=0`` gives ``J d >= 0`` up to round-off).
    torchjd solves each QP with quadprog on the CPU; mtlopt solves them all at once, to about
    machine precision: on the CPU (up to 16 tasks) every problem's first pivoting face in one
    batched solve, certified on the host (:mod:`mtlopt.solvers.dual_cone_cpu`), else block
    principal pivoting; on other devices face enumeration or an interior point, with no host
    synchronisation.

    Non-conflicting (the paper's main property): ``g_i . d >= 0`` for every task when
    ``p >= 0``, up to the ``reg_eps`` slack above and except below the ``norm_eps`` threshold.
    Task heads receive their own gradient. Stateless.

    Args:
        pref_vector: weights ``p`` of the projected gradients (a 1-D tensor or a sequence of
            ``m`` finite numbers); ``None`` (default) means ``1/m`` each.
        norm_eps: trace threshold below which the Gramian counts as zero (``>= 0``, default
            ``1e-4`` as torchjd).
        reg_eps: ridge added to the normalised Gramian (``>= 0``, default ``1e-4`` as torchjd).
    """

    solves_on_host = True

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        weights = self.weights_on_cpu(gramian, each_task=True)
        if weights is not None:
            return weights
        conditioned = self.conditioned_gramian(gramian)
        projections = dual_cone_weights(conditioned, torch.diag(self.preference(gramian)))
        return projections.sum(0)
