"""Nash-MTL: multi-task learning as a bargaining game."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..solvers import host_linalg
from ..solvers.bargaining import bargaining_weights
from .base import Weighting, copy_tensor_state


def check_positive_int(name: str, value: int) -> int:
    """Validate a positive ``int`` hyperparameter."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


class NashMTL(Weighting):
    r"""Nash-MTL: the Nash bargaining solution among the tasks.

    Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik and Fetaya, "Multi-Task Learning as
    a Bargaining Game", ICML 2022 (Section 3: the bargaining solution ``d = J^T a`` with
    ``G a = 1 / a``, ``a > 0``, element-wise; Algorithm 1; official code AvivNavon/nash-mtl).

    The update maximises ``sum_i log(g_i^T d)`` over ``||d|| <= 1`` up to scale; it is
    ``d = J^T a`` with ``G a = 1 / a``, so every task improves (``g_i^T d = 1 / a_i > 0``)
    and ``||d||^2 = a^T G a = m``. The reference solves the system by a sequence of convex
    programs (cvxpy/ECOS, at most ``optim_niter`` of them, warm-started from the previous
    ``a``). mtlopt solves the same system exactly in torch
    (:func:`mtlopt.solvers.bargaining.bargaining_weights`): ``optim_niter`` Newton steps with
    a line search on the convex potential ``1/2 a^T G a - sum_i log a_i``, warm-started from
    the previous ``a`` whenever that start is better than the cold one (the solution does
    not depend on the start).

    Like the reference, the weights are recomputed every ``update_weights_every`` steps and
    reused in between (the clipping below still uses the current Gramian), and the update's
    norm is clipped to ``max_norm``: the reference calls ``clip_grad_norm_`` on the shared
    parameters inside its ``backward``; mtlopt scales the weights by
    ``min(1, max_norm / ||a^T J||)`` with ``||a^T J||^2 = a^T G a``, which clips the group's
    update the same way. Since ``||a^T J|| = sqrt(m)`` at the exact solution, with the
    default ``max_norm = 1`` and ``m >= 2`` the update always has norm 1.

    Degenerate inputs (the reference keeps its previous ``a`` when the solver fails): a task
    with a zero gradient gets weight 0 (its utility is 0 whatever the update), and a relative
    ridge of ``1e-10 G_ii`` keeps ``a`` finite when no update improves every task (opposite
    gradients, zero in their convex hull); the update then shrinks towards 0.

    Args:
        update_weights_every: recompute ``a`` every this many steps (default 1).
        optim_niter: Newton iterations per recomputation (default 20, the reference's cap on
            its convex sub-problems; Newton's method reaches round-off well within it).
        max_norm: clip the update's norm to this (default 1.0, the reference); 0 disables.

    State (per param group): the step counter and the last ``a`` (float64 ``[m]``).
    """

    needs = "gramian"
    solves_on_host = True
    stateful = True

    def __init__(
        self, update_weights_every: int = 1, optim_niter: int = 20, max_norm: float = 1.0
    ) -> None:
        super().__init__()
        self.update_weights_every = check_positive_int("update_weights_every", update_weights_every)
        self.optim_niter = check_positive_int("optim_niter", optim_niter)
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)):
            raise TypeError(f"max_norm: expected a number >= 0, got {type(max_norm).__name__}")
        if not (max_norm >= 0 and max_norm < float("inf")):
            raise ValueError(f"max_norm: expected a finite number >= 0 (0: off), got {max_norm!r}")
        self.max_norm = float(max_norm)
        self.step = 0
        self.alpha: Tensor | None = None

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "update_weights_every": self.update_weights_every,
            "optim_niter": self.optim_niter,
            "max_norm": self.max_norm,
        }

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        gramian = gramian.to(torch.float64)
        if self.n_tasks is None:
            self.n_tasks = gramian.shape[0]
        previous = self.alpha
        if previous is not None and previous.device != gramian.device:
            previous = previous.to(gramian.device)
        if previous is None or self.step % self.update_weights_every == 0:
            self.alpha = bargaining_weights(gramian, 1.0, self.optim_niter, initial=previous)
        else:
            self.alpha = previous
        self.step += 1
        weights = self.alpha
        if self.max_norm > 0:
            weights = weights * self._clip_factor(weights, gramian)
        return weights

    def _clip_factor(self, weights: Tensor, gramian: Tensor) -> Tensor | float:
        """``min(1, max_norm / ||a^T J||)``, on Python floats on the CPU with few tasks."""
        if host_linalg.on_host(gramian):
            a = weights.tolist()
            squared = host_linalg.dot(a, host_linalg.matvec(gramian.tolist(), a))
            norm = math.sqrt(max(squared, 0.0))  # (max keeps a nan first argument)
            return min(self.max_norm / norm, 1.0) if norm != 0.0 else 1.0
        norm = (weights @ gramian @ weights).clamp(min=0).sqrt()
        return torch.clamp(self.max_norm / norm, max=1.0)

    def state_dict(self) -> dict[str, Any]:
        return {
            "n_tasks": self.n_tasks,
            "step": self.step,
            "alpha": None if self.alpha is None else self.alpha.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"state_dict: step should be a non-negative int, got {step!r}")
        self.step = step
        alpha = state["alpha"]
        self.alpha = None if alpha is None else copy_tensor_state(None, alpha, "alpha")
