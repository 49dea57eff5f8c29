"""Impartial Multi-Task Learning: IMTL-G (gradient balance), IMTL-L (loss balance), IMTL."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..solvers import gramian_rtol, host_linalg, pinv_solve
from .base import Weighting
from .imtl_host import imtl_g_on_host
from .learned import LearnedPerTask


def imtl_g_weights(gramian: Tensor, rtol: float) -> Tensor:
    """IMTL-G's weights ``a`` (summing to 1) from the Gramian, defined for any rank.

    The update ``d = J^T a`` has equal projections on all unit gradients ``u_i`` when
    ``G a = c sqrt(diag G)``. With ``D = diag(||g_i||)`` and the cosine matrix
    ``K = D^-1 G D^-1`` this reads ``K (D a) = c 1``, so ``a = D^-1 K^+ 1``, normalised to sum 1
    (equal to ``G^-1 sqrt(diag G)`` normalised, the paper's Eq. 8, when ``J`` has full row rank).
    Working on ``K`` makes the rank cut-off independent of the gradients' scales, which is
    the imbalance IMTL-G exists to handle. Tasks with a zero gradient get weight 0; if the
    weights cannot be normalised (all gradients zero) they are all zero. On the CPU with up
    to 16 tasks a well-conditioned ``K`` is solved on Python floats first
    (:mod:`mtlopt.weighting.imtl_host`).
    """
    if host_linalg.on_host(gramian):
        solved = imtl_g_on_host(gramian.tolist(), rtol)
        if solved is not None:
            return torch.tensor(solved, dtype=gramian.dtype)
    norms = gramian.diagonal().clamp(min=0).sqrt()
    active = norms > norms.amax() * 1e-150  # exact zeros (and denormal dust) carry no direction
    safe = torch.where(active, norms, torch.ones_like(norms))
    cosines = gramian / torch.outer(safe, safe)
    cosines = torch.where(torch.outer(active, active), cosines, torch.zeros_like(cosines))
    scaled = pinv_solve(cosines, active.to(gramian.dtype), rtol)
    v = torch.where(active, scaled / safe, torch.zeros_like(scaled))
    total = v.sum()
    degenerate = total.abs() <= 1e-12 * v.abs().sum()
    return torch.where(degenerate, torch.zeros_like(v), v / torch.where(degenerate, 1.0, total))


class IMTLG(Weighting):
    r"""IMTL-G: the update's projection on every task's unit gradient is the same.

    Liu, Li, Kuang, Xue, Chen, Yang, Liao and Zhang, "Towards Impartial Multi-task Learning",
    ICLR 2021 (Section 3.2, Eqs. 4-8, Theorem 1).

    With ``u_i = g_i / ||g_i||`` the paper solves ``d^T (u_1 - u_i) = 0`` for ``d = sum_i a_i g_i``
    and ``sum_i a_i = 1``, giving ``a_{2..m} = g_1 U^T (D U^T)^{-1}`` (Eq. 8). mtlopt computes the
    same weights from the Gramian alone, ``a = v / sum(v)`` with ``v = G^-1 sqrt(diag G)``,
    solved through the cosine matrix with a pseudo-inverse (eigenvalues below ``10 m eps`` of
    the largest dropped), which keeps it defined when the gradients are linearly dependent and
    exact whatever their scales. Task heads receive their own gradient.
    """

    needs = "gramian"
    solves_on_host = True

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        return imtl_g_weights(gramian, gramian_rtol(torch.float32, gramian.shape[0]))


class IMTLL(LearnedPerTask):
    r"""IMTL-L: learnable loss scales that make the scaled losses stay at a constant value.

    Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021 (Section 3.1, Eq. 2).

    Each task gets a log-scale ``s_i`` (zeros at start); the parameters are trained on
    ``sum_i exp(s_i) L_i`` and the scales on ``sum_i (exp(s_i) L_i - s_i)``, whose gradient
    ``exp(s_i) L_i - 1`` mtlopt writes in closed form (no extra backward). The scales are
    trained by the base optimizer as an extra param group that inherits the base optimizer's
    defaults, with ``lr`` overriding the learning rate when given, so LR schedulers and
    checkpoints cover them. IMTL-L is ``2 x`` uncertainty weighting with ``s = -log-variance``.

    Needs the losses only: a step costs one ordinary backward pass. Task heads get
    ``exp(s_t) grad L_t``.

    Args:
        lr: learning rate of the scales' param group (default: the base optimizer's).
        n_tasks: create the scales at construction (so LR schedulers built before the first
            step see their group); otherwise they are created on the first step.
    """

    needs = "losses"
    parameter_name = "log_scales"

    @property
    def log_scales(self) -> Tensor:
        """The learnable log-scales ``s`` (empty until the number of tasks is known)."""
        return self.parameter

    def __repr__(self) -> str:
        return f"{type(self).__name__}(lr={self.lr!r})"

    def scales(self, losses: Tensor) -> Tensor:
        """``exp(s)`` in float64 (ones before the scales exist: ``s`` starts at zero)."""
        return self.step_terms(losses)[0]

    def loss_weights(self, losses: Tensor) -> Tensor:
        return self.scales(losses)

    def terms(self, values: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        scales = values.exp()
        return scales, scales * losses - 1.0

    def host_terms(
        self, values: list[float], losses: list[float]
    ) -> tuple[list[float], list[float]]:
        scales = [math.exp(s) for s in values]
        return scales, [c * loss - 1.0 for c, loss in zip(scales, losses)]


class IMTL(IMTLL):
    r"""IMTL, the paper's hybrid: IMTL-L's loss scales plus IMTL-G on the scaled gradients.

    Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021 (Section 3.3, Algorithm 1).

    The losses are scaled to ``exp(s_i) L_i - s_i`` (IMTL-L); the shared parameters of the group
    receive IMTL-G applied to the gradients of the scaled losses, ``d = sum_i a_i exp(s_i) g_i``;
    a task head receives its scaled loss gradient ``exp(s_t) grad L_t``; each ``s_i`` receives
    ``exp(s_i) L_i - 1``. The scales form an extra param group of the base optimizer (see
    :class:`IMTLL` for ``lr`` and ``n_tasks``).
    """

    needs = "gramian"
    solves_on_host = True

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        # The optimizer hands in the Gramian of the scaled gradients already.
        return imtl_g_weights(gramian, gramian_rtol(torch.float32, gramian.shape[0]))
