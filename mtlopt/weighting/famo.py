"""FAMO: fast adaptive multitask optimization (loss values only, O(1) per step)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .base import Weighting, check_non_negative, check_positive, copy_tensor_state
from .loss_balancing import check_losses_above

_EPS = 1e-8  # added to L - L_min before the logarithm, as in the authors' code
# Adam's constants for the logits (torch.optim.Adam's defaults, which the authors use).
_BETA1, _BETA2, _ADAM_EPS = 0.9, 0.999, 1e-8


class FAMO(Weighting):
    r"""FAMO: balance the tasks' loss decrease rates with O(1) extra cost per step.

    Liu, Feng, Stone and Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023
    (Algorithm 1); the authors' code ``Cranial-XIX/FAMO`` and LibMTL's ``FAMO``.

    Task logits ``xi`` (zeros at start), ``z = softmax(xi)``, ``D_i = L_i - L_min,i + 1e-8``.
    The model is trained on ``c sum_i z_i log D_i`` with ``c = 1 / sum_j (z_j / D_j)`` held
    constant, i.e. with the loss weights (the exact gradient)::

        c_i = c z_i / D_i

    After the parameter step the logits learn from the loss decrease: with
    ``delta_i = log D_i(before) - log D_i(after)`` on the same batch, the logits' gradient is
    ``delta`` pushed through the softmax Jacobian, ``z * (delta - z . delta)``, and ``xi``
    takes an Adam step (``lr = w_lr``, L2 weight decay ``gamma``, betas (0.9, 0.999), eps
    1e-8, bias-corrected, as ``torch.optim.Adam``), implemented here on plain tensors.

    Where the post-step losses come from (:meth:`observe`):
        * ``opt.step(closure)``: the optimizer re-evaluates the closure after the base step
          (same batch, as the paper); ``xi`` is updated with (this step's, re-evaluated) losses.
        * ``opt.step(losses)`` (no closure): the next step's losses stand in for the
          post-step losses, so ``xi`` is updated one step late, on (step t, step t+1) losses
          of different batches. It needs no extra forward pass but mixes batch noise into
          ``delta``. The pending losses are part of the state.

    A post-step loss below its lower bound counts as the bound (the authors' code would take
    the log of a non-positive number). The authors' code also clips the shared parameters'
    gradient norm to 1.0 (``max_norm``); in mtlopt clipping is the user's choice
    (``opt.backward(losses)``, ``torch.nn.utils.clip_grad_norm_``, ``opt.step()``).

    Args:
        gamma: weight decay of the logits (``>= 0``; 1e-3 as in the authors' QM9 script and
            LibMTL's default; the authors' ``famo.py`` defaults to 0.01, their
            ``weight_methods.py`` to 1e-5).
        w_lr: Adam learning rate of the logits (``> 0``; 0.025, the authors' and LibMTL's).
        min_losses: lower bounds ``L_min`` of the losses (a number for all tasks, or one per
            task; default 0). Losses below them raise ValueError.
    """

    needs = "losses"
    stateful = True
    wants_losses_after_step = True

    def __init__(
        self, gamma: float = 1e-3, w_lr: float = 0.025, min_losses: float | Sequence[float] = 0.0
    ) -> None:
        super().__init__()
        self.gamma = check_non_negative("gamma", gamma)
        self.w_lr = check_positive("w_lr", w_lr)
        self.min_losses: float | list[float]
        if isinstance(min_losses, (int, float)) and not isinstance(min_losses, bool):
            self.min_losses = float(min_losses)
            bounds = [self.min_losses]
        elif isinstance(min_losses, Sequence) and not isinstance(min_losses, (str, bytes)):
            for index, value in enumerate(min_losses):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise TypeError(
                        f"min_losses[{index}]: expected a number, got {type(value).__name__}"
                    )
            self.min_losses = [float(v) for v in min_losses]
            bounds = self.min_losses
            if not bounds:
                raise ValueError("min_losses: expected a number or one number per task, got []")
        else:
            raise TypeError(
                f"min_losses: expected a number or a sequence of numbers, "
                f"got {type(min_losses).__name__}"
            )
        if not all(abs(v) < float("inf") for v in bounds):
            raise ValueError(f"min_losses: expected finite numbers, got {min_losses!r}")
        self._bounds_on_device: dict[torch.device, Tensor] = {}
        self.logits: Tensor | None = None
        self.exp_avg: Tensor | None = None
        self.exp_avg_sq: Tensor | None = None
        self.adam_steps = 0
        self.pending_losses: Tensor | None = None

    def hyperparameters(self) -> dict[str, Any]:
        bounds = self.min_losses
        return {
            "gamma": self.gamma,
            "w_lr": self.w_lr,
            "min_losses": list(bounds) if isinstance(bounds, list) else bounds,
        }

    # ----------------------------------------------------------------- loss weights
    def _bounds(self, losses: Tensor) -> Tensor:
        if isinstance(self.min_losses, list):
            if len(self.min_losses) != losses.numel():
                raise ValueError(
                    f"losses: {self!r} has {len(self.min_losses)} lower bounds (min_losses), "
                    f"got {losses.numel()} losses"
                )
            cached = self._bounds_on_device.get(losses.device)
            if cached is None:  # one host-to-device copy per device, not per step
                cached = torch.tensor(self.min_losses, dtype=torch.float64, device=losses.device)
                self._bounds_on_device[losses.device] = cached
            return cached
        return torch.full_like(losses, self.min_losses)

    def task_weights(self, losses: Tensor) -> Tensor:
        """``z = softmax(xi)`` (uniform before the first update)."""
        if self.logits is None:
            return torch.full_like(losses, 1.0 / losses.numel())
        return torch.softmax(self.logits.to(losses.device), 0)

    def loss_weights(self, losses: Tensor) -> Tensor:
        self.check_n_tasks(losses.numel())
        bounds = self._bounds(losses)
        check_losses_above(losses, self.min_losses, "FAMO", False, "losses >= min_losses")
        z = self.task_weights(losses)
        distance = losses - bounds + _EPS
        ratio = z / distance
        return ratio / ratio.sum()

    # ----------------------------------------------------------------- logits update
    def _log_distance(self, losses: Tensor) -> Tensor:
        return ((losses - self._bounds(losses)).clamp(min=0) + _EPS).log()

    def _ensure_state(self, losses: Tensor) -> None:
        m = losses.numel()
        self.check_n_tasks(m)
        self.n_tasks = m
        if self.logits is None:
            self.logits = torch.zeros_like(losses)
            self.exp_avg = torch.zeros_like(losses)
            self.exp_avg_sq = torch.zeros_like(losses)
        elif self.logits.device != losses.device:
            self.logits = self.logits.to(losses.device)
            self.exp_avg = None if self.exp_avg is None else self.exp_avg.to(losses.device)
            self.exp_avg_sq = None if self.exp_avg_sq is None else self.exp_avg_sq.to(losses.device)

    def update_logits(self, before: Tensor, after: Tensor) -> None:
        """One Adam step of the logits from the losses before and after a parameter step."""
        self._ensure_state(after)
        logits, exp_avg, exp_avg_sq = self.logits, self.exp_avg, self.exp_avg_sq
        assert logits is not None and exp_avg is not None and exp_avg_sq is not None
        delta = self._log_distance(before.to(after.device)) - self._log_distance(after)
        z = torch.softmax(logits, 0)
        grad = z * (delta - (z * delta).sum()) + self.gamma * logits
        self.adam_steps += 1
        exp_avg.mul_(_BETA1).add_(grad, alpha=1.0 - _BETA1)
        exp_avg_sq.mul_(_BETA2).addcmul_(grad, grad, value=1.0 - _BETA2)
        correction1 = 1.0 - _BETA1**self.adam_steps
        correction2 = 1.0 - _BETA2**self.adam_steps
        denominator = (exp_avg_sq / correction2).sqrt().add_(_ADAM_EPS)
        logits.sub_(self.w_lr * (exp_avg / correction1) / denominator)

    def observe(self, losses: Tensor, after_step: bool) -> None:
        self._ensure_state(losses)
        if after_step:
            if self.pending_losses is not None:
                self.update_logits(self.pending_losses, losses)
                self.pending_losses = None
            return
        if self.pending_losses is not None:  # no closure: this step's losses stand in
            self.update_logits(self.pending_losses, losses)
        self.pending_losses = losses.detach().clone()

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        def clone(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.clone()

        return {
            "n_tasks": self.n_tasks,
            "logits": clone(self.logits),
            "exp_avg": clone(self.exp_avg),
            "exp_avg_sq": clone(self.exp_avg_sq),
            "adam_steps": self.adam_steps,
            "pending_losses": clone(self.pending_losses),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)

        def load(name: str) -> Tensor | None:
            value = state[name]
            return None if value is None else copy_tensor_state(None, value, name)

        self.logits = load("logits")
        self.exp_avg = load("exp_avg")
        self.exp_avg_sq = load("exp_avg_sq")
        self.adam_steps = int(state["adam_steps"])
        self.pending_losses = load("pending_losses")
