"""GradNorm: learnable task weights that equalise the tasks' training rates."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import check_non_negative, copy_tensor_state
from .learned import LearnedPerTask

#: Floor of the raw weights before renormalisation: keeps every weight positive (the paper
#: does not say what happens when a step drives one to zero or below) and every task's
#: gradient norm recoverable from the weighted Gramian.
_MIN_WEIGHT = 1e-6


class GradNorm(LearnedPerTask):
    r"""GradNorm: task weights trained so that the weighted gradient norms follow the tasks'
    relative inverse training rates.

    Chen, Badrinarayanan, Lee and Rabinovich, "GradNorm: Gradient Normalization for Adaptive
    Loss Balancing in Deep Multitask Networks", ICML 2018 (Section 3, Eqs. 1-2, Algorithm 1).

    With task weights ``w`` (ones at start), the group's shared parameters ``W`` and
    ``g_i = grad_W L_i``::

        G_W^i = ||grad_W (w_i L_i)|| = w_i ||g_i||,    Gbar_W = mean_i G_W^i
        Ltilde_i = L_i / L_i(0),    r_i = Ltilde_i / mean_j Ltilde_j
        L_grad = sum_i | G_W^i - Gbar_W r_i^alpha |                             (Eq. 2)

    with the target ``Gbar_W r_i^alpha`` held constant (as the paper says), so
    ``dL_grad / dw_i = sign(G_W^i - target_i) ||g_i||``, written in closed form. The model
    is trained on ``sum_i w_i L_i``: the shared parameters get ``d = sum_i w_i g_i``, each task
    head gets ``w_t grad L_t``. ``L_i(0)`` are the losses of the first step (state).

    The weights are trained by the base optimizer as an extra param group (like
    :class:`~mtlopt.weighting.IMTLL`; ``lr`` overrides its learning rate). Renormalisation
    (the paper renormalises to ``sum_i w_i = m`` after each update): the weights used are
    always ``m w / sum(w)`` (with ``w`` floored at 1e-6), and the raw tensor is reset to
    these values each step before its gradient is added, so the base optimizer's step is
    taken from renormalised weights exactly as in the paper.

    Which layer: the paper measures ``G_W`` at the last shared layer. mtlopt measures it over
    the shared parameters of the group this weighting serves; to follow the paper put the last
    shared layer in its own param group with GradNorm (the group's weights then scale that
    group's update; other groups have their own weightings). A group without shared
    parameters learns nothing (its weights stay where they are). LibMTL parametrises
    ``w = m softmax(v)`` and measures all shared parameters (or the representation); the paper
    trains ``w`` directly. Losses are assumed positive (``L_i(0) = 0`` counts as ratio 1).

    Args:
        alpha: the restoring-force strength ``alpha`` (``>= 0``; 1.5 as in the paper's NYUv2
            experiments and LibMTL).
        lr: learning rate of the weights' param group (default: the base optimizer's).
        n_tasks: create the weights at construction (otherwise on the first step).
    """

    needs = "gramian"
    stateful = True

    parameter_name = "raw_weights"
    initial_value = 1.0

    def __init__(
        self, alpha: float = 1.5, lr: float | None = None, n_tasks: int | None = None
    ) -> None:
        self.alpha = check_non_negative("alpha", alpha)
        super().__init__(lr=lr, n_tasks=n_tasks)
        self.initial_losses: Tensor | None = None
        self._gradient_norms: Tensor | None = None  # ||g_i|| of the step in progress

    @property
    def raw_weights(self) -> Tensor:
        """The learnable weights before renormalisation (empty until the first step)."""
        return self.parameter

    def hyperparameters(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "lr": self.lr}

    def task_weights(self, losses: Tensor) -> Tensor:
        """The weights in use, ``m w / sum(w)`` in float64 (ones before ``w`` exists)."""
        raw = self.learned(losses)
        if raw is None:
            return torch.ones_like(losses)
        floored = raw.clamp(min=_MIN_WEIGHT)
        return raw.numel() * floored / floored.sum()

    def loss_weights(self, losses: Tensor) -> Tensor:
        self.check_n_tasks(losses.numel())
        return self.task_weights(losses)

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        # The optimizer hands in the Gramian of the weighted gradients w_i g_i: its diagonal
        # gives G_W^i, and the update sum_i 1 (w_i g_i) is the paper's.
        weighted_norms = gramian.diagonal().clamp(min=0).sqrt()
        self._gradient_norms = weighted_norms / self.task_weights(losses).to(gramian.device)
        return torch.ones_like(weighted_norms)

    def weight_gradient(self, losses: Tensor, gradient_norms: Tensor) -> Tensor:
        """``dL_grad / dw`` (Eq. 2, target constant) at the weights in use, float64."""
        weights = self.task_weights(losses)
        initial = self.initial_losses
        assert initial is not None
        initial = initial.to(losses.device)
        safe = torch.where(initial != 0, initial, torch.ones_like(initial))
        ratios = torch.where(initial != 0, losses / safe, torch.ones_like(losses))
        mean_ratio = ratios.mean()
        relative = torch.where(
            mean_ratio > 0, ratios / torch.where(mean_ratio > 0, mean_ratio, 1.0), 1.0
        ).clamp(min=0)
        weighted_norms = weights * gradient_norms
        target = weighted_norms.mean() * relative**self.alpha
        return torch.sign(weighted_norms - target) * gradient_norms

    def accumulate_parameter_grads(self, losses: Tensor) -> None:
        if self.initial_losses is None:
            self.initial_losses = losses.detach().clone()
        norms, self._gradient_norms = self._gradient_norms, None
        # Without shared parameters in this group there is nothing to balance.
        grad = None if norms is None else self.weight_gradient(losses, norms.to(losses.device))
        with torch.no_grad():  # renormalise: the base optimizer steps from m w / sum(w)
            self.parameter.data.copy_(self.task_weights(losses).to(self.parameter))
        if grad is not None:
            self.add_parameter_grad(grad)

    def state_dict(self) -> dict[str, Any]:
        initial = self.initial_losses
        return {
            **super().state_dict(),
            "initial_losses": None if initial is None else initial.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        initial = state.get("initial_losses")
        super().load_state_dict(state)
        self.initial_losses = (
            None if initial is None else copy_tensor_state(None, initial, "initial_losses")
        )
