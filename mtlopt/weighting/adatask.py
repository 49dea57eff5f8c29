"""AdaTask: Adam moments kept separately for every task."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..reachability import single_task
from .base import Weighting, check_positive, check_state_layout, copy_tensor_state, follow_blocks


def _check_betas(betas: object) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas: expected a pair of numbers in [0, 1), got {betas!r}")
    checked = []
    for index, value in enumerate(betas):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(
                f"betas[{index}]: expected a number in [0, 1), got {type(value).__name__}"
            )
        if not 0.0 <= value < 1.0:
            raise ValueError(f"betas[{index}]: expected a number in [0, 1), got {value!r}")
        checked.append(float(value))
    return checked[0], checked[1]


class AdaTask(Weighting):
    r"""Task-aware Adam: per-task first and second moments, the per-task Adam steps summed.

    Yang, Pan, Wang, Yu, Shen, Chen, Xiao, Jiang and Guo, "AdaTask: A Task-aware Adaptive
    Learning Rate Approach to Multi-task Learning", AAAI 2023 (the Adam variant; code
    EnnengYang/AdaTask, ``Adam_with_AdaTask``).

    For a shared tensor, with task ``i``'s gradient ``g_i`` at step ``t``::

        m_i <- beta1 m_i + (1 - beta1) g_i
        v_i <- beta2 v_i + (1 - beta2) g_i^2
        u    = sum_i (m_i / (1 - beta1^t)) / (sqrt(v_i / (1 - beta2^t)) + eps)

    For a task head (a tensor reached by one task at the first step) it is plain Adam on that
    task's gradient, which is the gradient of the summed loss there (the reference's rule for
    task-specific parameters). ``u`` is written as the gradient, so the lr is applied by the
    base optimizer.

    .. warning::
        **AdaTask is an optimizer, not a weighting.** It produces the Adam-normalised
        direction ``u`` itself, so the base optimizer must be plain ``torch.optim.SGD``
        (``momentum=0``, no ``nesterov``): SGD then applies each param group's ``lr`` (and
        schedulers) and ``weight_decay``, i.e. ``p <- p - lr (u + weight_decay p)``, which is
        AdamW-style decoupled weight decay scaled by the lr. With Adam or SGD with momentum as
        the base, Adam would run a second time on top of AdaTask. The reference code ignores
        weight decay and applies the last param group's lr to every parameter; mtlopt honours
        both per group.

    It uses ``aggregates_task_heads``: the heads of its groups come through
    :meth:`update_from_jacobian` too, so every parameter of an AdaTask group gets an Adam
    step. The moments advance at each ``backward``/``step(losses)`` call, so accumulating
    gradients over several calls sums several Adam directions (as it would with Adam).

    Args:
        betas: ``(beta1, beta2)``, each in ``[0, 1)`` (Adam's and the reference's defaults).
        eps: added to the denominator (> 0).

    State (per param group): a step counter and, per tensor, ``exp_avg`` and ``exp_avg_sq`` of
    shape ``[m, *shape]`` for a shared tensor (memory ``2 m`` times the tensor, twice the size
    of its Jacobian) and ``[1, *shape]`` for a task head (as Adam), in the parameters' dtype.
    The group's tensors and their shared/head roles must stay the same across steps.
    """

    needs = "jacobian"
    stateful = True
    expects_plain_sgd = True
    aggregates_task_heads = True

    def __init__(self, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        super().__init__()
        self.betas = _check_betas(betas)
        self.eps = check_positive("eps", eps)
        self.exp_avg: list[Tensor] | None = None
        self.exp_avg_sq: list[Tensor] | None = None
        self.step = 0

    def hyperparameters(self) -> dict[str, Any]:
        return {"betas": self.betas, "eps": self.eps}

    def check_layout(self, jacobian: list[Tensor], masks: list[int] | None = None) -> None:
        # Heads keep one row of moments, shared tensors m: compare the tensors' own shapes.
        holder = "AdaTask keeps Adam moments (each tensor must be reached by some loss)"
        check_state_layout(holder, self.exp_avg, jacobian, per_row=False)
        if self.exp_avg is None or masks is None or not jacobian:
            return
        m = jacobian[0].shape[0]
        for index, (moment, mask) in enumerate(zip(self.exp_avg, masks)):
            if moment.shape[0] == 1 and m > 1 and single_task(mask) is None:
                raise ValueError(
                    f"AdaTask: tensor {index} of its group was a task head (reached by one loss) "
                    f"at the first step and is now reached by several (task mask {mask:#b}); "
                    "its per-task moments do not exist. Keep each tensor's role fixed"
                )

    def _prepare(
        self, jacobian: list[Tensor], masks: list[int]
    ) -> tuple[list[Tensor], list[Tensor]]:
        m = jacobian[0].shape[0]
        if self.exp_avg is None or self.exp_avg_sq is None:
            self.n_tasks = m
            rows = [1 if single_task(mask) is not None else m for mask in masks]
            self.exp_avg = [
                block.new_zeros((r, *block.shape[1:])) for r, block in zip(rows, jacobian)
            ]
            self.exp_avg_sq = [torch.zeros_like(moment) for moment in self.exp_avg]
        self.check_layout(jacobian, masks)
        self.exp_avg = follow_blocks(self.exp_avg, jacobian)
        self.exp_avg_sq = follow_blocks(self.exp_avg_sq, jacobian)
        return self.exp_avg, self.exp_avg_sq

    def update_from_jacobian(
        self, jacobian: list[Tensor], losses: Tensor, masks: list[int]
    ) -> tuple[list[Tensor], Tensor | None]:
        if not jacobian:
            raise ValueError("AdaTask needs at least one parameter in its group")
        exp_avg, exp_avg_sq = self._prepare(jacobian, masks)
        m = jacobian[0].shape[0]
        beta1, beta2 = self.betas
        self.step += 1
        correction1 = 1.0 - beta1**self.step
        root_correction2 = math.sqrt(1.0 - beta2**self.step)
        updates = []
        for block, first, second in zip(jacobian, exp_avg, exp_avg_sq):
            # A head's moments follow the summed loss's gradient (its own task's row).
            grad = block if first.shape[0] == m else block.sum(0, keepdim=True)
            first.lerp_(grad, 1.0 - beta1)
            second.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            denominator = (second.sqrt() / root_correction2).add_(self.eps)
            updates.append((first / correction1).div_(denominator).sum(0))
        return updates, None

    def state_dict(self) -> dict[str, Any]:
        def clones(moments: list[Tensor] | None) -> list[Tensor] | None:
            return None if moments is None else [t.clone() for t in moments]

        return {
            "n_tasks": self.n_tasks,
            "step": self.step,
            "exp_avg": clones(self.exp_avg),
            "exp_avg_sq": clones(self.exp_avg_sq),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)

        def load(name: str) -> list[Tensor] | None:
            saved = state[name]
            if saved is None:
                return None
            return [copy_tensor_state(None, t, f"{name}[{k}]") for k, t in enumerate(saved)]

        self.step = int(state["step"])
        self.exp_avg = load("exp_avg")
        self.exp_avg_sq = load("exp_avg_sq")
