"""MoCo: stochastic multi-objective gradient correction by tracking."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..solvers.simplex import project_simplex
from .base import (
    Weighting,
    check_non_negative,
    check_positive,
    check_state_layout,
    combine,
    copy_tensor_state,
    follow_blocks,
)

_NORMALIZATIONS = ("loss", "none")
_NORM_EPS = 1e-8  # added to the gradient norm before the loss normalisation (LibMTL)


class MoCo(Weighting):
    r"""Multi-objective gradient Correction: track each task's gradient, then weight the tracks.

    Fernando, Shen, Liu, Chaudhury, Murugesan and Chen, "Mitigating Gradient Bias in
    Multi-objective Learning: A Provably Convergent Approach", ICLR 2023 (Algorithm 1).

    Each step ``t = 1, 2, ...`` with per-task (stochastic) gradients ``h_i`` of the group's
    shared parameters::

        y_i    <- y_i - beta_t (y_i - h_i)                              (tracking)
        lambda <- Proj_simplex(lambda - gamma_t (Y Y^T + rho I) lambda)  (weights)
        d       = Y^T lambda                                            (update)

    with ``Y = [y_1; ...; y_m]``, ``beta_t = beta / t**beta_sigma`` and
    ``gamma_t = gamma / t**gamma_sigma``. ``y`` starts at zero and ``lambda`` at ``1/m``. The
    update handed to the base optimizer is ``d`` (not ``w^T J``); the returned weights are
    ``lambda`` (for logging: they weight the tracked gradients ``Y``, not ``J``).

    Conventions (the references disagree):
        * Step sizes: ``beta / t**beta_sigma`` and ``gamma / t**gamma_sigma``, ``t`` counted from
          1, as in LibMTL and the authors' ``Tracking`` code; the defaults (0.5, 0.5, 0.1, 0.5,
          rho = 0) are LibMTL's. The authors' NYU-v2 script used constant rates
          (``beta = 0.99``, ``gamma = 0.1``, both sigmas 0).
        * The ``lambda`` step uses ``(Y Y^T + rho I) lambda``, the gradient of
          ``1/2 ||Y^T lambda||^2 + rho/2 ||lambda||^2`` (paper, authors' toy code, LibMTL);
          the authors' ``Tracking`` code uses twice that with ``rho = 0``.
        * ``lambda`` is projected onto the simplex as in the paper and the authors' code;
          LibMTL applies a softmax instead of the projection. mtlopt follows the paper.
        * The paper projects each ``y_i`` onto a ball of radius ``L_i`` (a bound used by the
          analysis only); the authors' code and LibMTL skip it, and so does mtlopt.
        * ``gradient_normalization="loss"`` (default) tracks ``h_i = |L_i| g_i / (||g_i|| +
          1e-8)`` (norm over the group's shared parameters), LibMTL's MoCo and the authors'
          ``raw_loss`` option; LibMTL multiplies by ``L_i`` itself, which would turn a negative
          loss's gradient into ascent, hence ``|L_i|`` (identical for non-negative losses).
          ``"none"`` tracks the raw gradients, as in the paper's Algorithm 1.

    Args:
        beta: tracking rate, in ``(0, 1]``.
        beta_sigma: decay exponent of the tracking rate (>= 0).
        gamma: step size of ``lambda`` (> 0).
        gamma_sigma: decay exponent of ``gamma`` (>= 0).
        rho: l2 regularisation of the ``lambda`` subproblem (>= 0).
        gradient_normalization: ``"loss"`` or ``"none"`` (see above).

    State (per param group): ``y`` (one ``[m, *shape]`` tensor per shared tensor, in the
    parameters' dtype: as large as the group's Jacobian), ``lambda`` (float64 ``[m]``) and the
    step counter. The group's shared parameters must stay the same across steps.
    """

    needs = "jacobian"
    stateful = True

    def __init__(
        self,
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
        gradient_normalization: str = "loss",
    ) -> None:
        super().__init__()
        self.beta = check_positive("beta", beta)
        if self.beta > 1.0:
            raise ValueError(f"beta: expected a number in (0, 1], got {beta!r}")
        self.beta_sigma = check_non_negative("beta_sigma", beta_sigma)
        self.gamma = check_positive("gamma", gamma)
        self.gamma_sigma = check_non_negative("gamma_sigma", gamma_sigma)
        self.rho = check_non_negative("rho", rho)
        if gradient_normalization not in _NORMALIZATIONS:
            raise ValueError(
                f"gradient_normalization: expected one of {_NORMALIZATIONS}, "
                f"got {gradient_normalization!r}"
            )
        self.gradient_normalization = gradient_normalization
        self.tracked: list[Tensor] | None = None
        self.lambd: Tensor | None = None
        self.step = 0

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "beta": self.beta,
            "beta_sigma": self.beta_sigma,
            "gamma": self.gamma,
            "gamma_sigma": self.gamma_sigma,
            "rho": self.rho,
            "gradient_normalization": self.gradient_normalization,
        }

    def check_layout(self, jacobian: list[Tensor], masks: list[int] | None = None) -> None:
        check_state_layout("MoCo keeps gradient tracks", self.tracked, jacobian)

    # ------------------------------------------------------------------ helpers
    def _prepare(self, jacobian: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        """The tracking tensors and lambda, created on the first call, checked afterwards."""
        m, device = jacobian[0].shape[0], jacobian[0].device
        if self.tracked is None or self.lambd is None:
            self.n_tasks = m
            self.tracked = [torch.zeros_like(block) for block in jacobian]
            self.lambd = torch.full((m,), 1.0 / m, dtype=torch.float64, device=device)
        self.check_layout(jacobian)
        self.tracked = follow_blocks(self.tracked, jacobian)
        self.lambd = self.lambd.to(device)
        return self.tracked, self.lambd

    def _task_scales(self, jacobian: list[Tensor], losses: Tensor) -> Tensor | None:
        """``|L_i| / (||g_i|| + 1e-8)`` (float64), or None without normalisation."""
        if self.gradient_normalization == "none":
            return None
        m = jacobian[0].shape[0]
        squares = torch.zeros(m, dtype=torch.float64, device=jacobian[0].device)
        for block in jacobian:
            squares += block.reshape(m, -1).to(torch.float64).pow(2).sum(1)
        magnitudes = losses.detach().to(device=squares.device, dtype=torch.float64).abs()
        return magnitudes / (squares.sqrt() + _NORM_EPS)

    # ------------------------------------------------------------------ the step
    def update_from_jacobian(
        self, jacobian: list[Tensor], losses: Tensor, masks: list[int]
    ) -> tuple[list[Tensor], Tensor | None]:
        if not jacobian:
            raise ValueError("MoCo needs at least one shared parameter in its group")
        tracked, lambd = self._prepare(jacobian)
        m = jacobian[0].shape[0]
        self.step += 1
        beta_t = self.beta / self.step**self.beta_sigma
        gamma_t = self.gamma / self.step**self.gamma_sigma
        scales = self._task_scales(jacobian, losses)
        gram = torch.zeros(m, m, dtype=torch.float64, device=lambd.device)
        for block, y in zip(jacobian, tracked):
            if scales is not None:
                block = block * scales.to(block.dtype).reshape(-1, *[1] * (block.dim() - 1))
            y.lerp_(block, beta_t)  # y - beta_t (y - h)
            flat = y.reshape(m, -1).to(torch.float64)
            gram += flat @ flat.T
        step = gram @ lambd + self.rho * lambd
        self.lambd = project_simplex(lambd - gamma_t * step)
        return [combine(self.lambd, y) for y in tracked], self.lambd.clone()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "n_tasks": self.n_tasks,
            "step": self.step,
            "lambd": None if self.lambd is None else self.lambd.clone(),
            "tracked": None if self.tracked is None else [y.clone() for y in self.tracked],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.step = int(state["step"])
        lambd, tracked = state["lambd"], state["tracked"]
        self.lambd = None if lambd is None else copy_tensor_state(None, lambd, "lambd")
        self.tracked = (
            None
            if tracked is None
            else [copy_tensor_state(None, y, f"tracked[{k}]") for k, y in enumerate(tracked)]
        )
