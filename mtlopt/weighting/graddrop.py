"""GradDrop: gradient sign dropout."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._rng import generator_state, new_generator, set_generator_state
from .base import Weighting, check_unit_interval


class GradDrop(Weighting):
    r"""Gradient sign dropout: per coordinate, keep one sign of the task gradients at random.

    Chen, Ngiam, Huang, Luong, Kretzschmar, Chai and Anguelov, "Just Pick a Sign: Optimizing
    Deep Multitask Models with Gradient Sign Dropout", NeurIPS 2020 (Algorithm 1, lines
    10-15, with the leak parameters).

    For every coordinate ``k`` of every shared tensor, with ``g_ik`` the task gradients::

        P_k = 1/2 (1 + sum_i g_ik / sum_i |g_ik|)          (positive sign purity)
        U_k ~ Uniform(0, 1)
        M_ik = [P_k > U_k] [g_ik > 0] + [P_k < U_k] [g_ik < 0]
        d_k = sum_i (l_i + (1 - l_i) M_ik) g_ik             (leak l_i; Algorithm 1)

    so a coordinate keeps only its positive components with probability ``P_k`` and only its
    negative ones otherwise. The update is a *sum* (leak 1 is :class:`Sum`), as in the paper,
    LibMTL and torchjd. It is not ``w^T J``: there are no task weights (logged as None).

    Conventions:
        * The paper applies GradDrop to the gradients at the activations of the last shared
          layer, with the sign of the activations folded in and summed over the batch (LibMTL
          supports only that representation-gradient mode). mtlopt applies it to the
          per-task gradients of the group's shared parameters, as torchjd's ``GradDrop``
          does with the Jacobian it is given; give the last shared layer its own param group
          to stay close to the paper. The monotone function ``f(P)`` of the paper is the
          identity (its default, and torchjd's).
        * A coordinate where every task gradient is zero contributes zero (``P`` is set to
          1/2 instead of 0/0). A task that does not reach a tensor has zero gradient there.
        * ``U`` comes from the weighting's own stream: a CPU generator seeded from torch's
          global RNG at construction (unless ``seed`` is given), whose state is checkpointed;
          each step draws one seed from it for a generator on the parameters' device, so
          ``U`` is sampled where the gradients live. Runs on different devices draw
          different ``U``. :meth:`spawn` derives a new stream for every param group.

    Args:
        leak: ``l_i`` in [0, 1], one number for all tasks or one per task (default 0: the
            plain method).
        seed: seed of the weighting's generator (None: drawn from torch's global RNG).
    """

    needs = "jacobian"
    stateful = True

    def __init__(self, leak: float | Sequence[float] = 0.0, seed: int | None = None) -> None:
        super().__init__()
        if isinstance(leak, (int, float)) and not isinstance(leak, bool):
            self.leak: float | tuple[float, ...] = check_unit_interval("leak", leak)
        elif isinstance(leak, Sequence) and not isinstance(leak, (str, bytes)) and leak:
            self.leak = tuple(check_unit_interval("leak", value) for value in leak)
        else:
            raise TypeError(
                "leak: expected a number in [0, 1] or a non-empty sequence of them, "
                f"got {leak!r:.80}"
            )
        self.seed = seed
        self._generator = new_generator(seed)
        self._leak_on_device: dict[torch.device, Tensor] = {}

    def hyperparameters(self) -> dict[str, Any]:
        leak = list(self.leak) if isinstance(self.leak, tuple) else self.leak
        return {"leak": leak, "seed": self.seed}

    def _leak(self, m: int, device: torch.device) -> Tensor | float:
        if not isinstance(self.leak, tuple):
            return self.leak
        if len(self.leak) != m:
            raise ValueError(
                f"leak: GradDrop was given {len(self.leak)} leak values, "
                f"but the step has {m} losses"
            )
        cached = self._leak_on_device.get(device)
        if cached is None:  # one host-to-device copy per device, not per step
            cached = torch.tensor(self.leak, dtype=torch.float64, device=device)
            self._leak_on_device[device] = cached
        return cached

    def _step_generator(self, device: torch.device) -> torch.Generator:
        """A generator on ``device`` seeded from the checkpointed CPU stream (no device sync)."""
        seed = int(torch.randint(0, 2**62, (1,), generator=self._generator))
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        return generator

    def update_from_jacobian(
        self, jacobian: list[Tensor], losses: Tensor, masks: list[int]
    ) -> tuple[list[Tensor], Tensor | None]:
        if not jacobian:
            return [], None
        m = jacobian[0].shape[0]
        self.check_n_tasks(m)
        leak = self._leak(m, jacobian[0].device)
        self.n_tasks = m
        generator = self._step_generator(jacobian[0].device)
        return [self._drop(block, leak, generator) for block in jacobian], None

    @staticmethod
    def _drop(block: Tensor, leak: Tensor | float, generator: torch.Generator) -> Tensor:
        # Purity and the uniform draw in at least float32 (half precision has no rand on CPU).
        work = block if block.dtype in (torch.float32, torch.float64) else block.float()
        total = work.sum(0)
        magnitude = work.abs().sum(0)
        nonzero = magnitude > 0
        ratio = total / torch.where(nonzero, magnitude, torch.ones_like(magnitude))
        purity = 0.5 * (1.0 + torch.where(nonzero, ratio, torch.zeros_like(ratio)))
        draw = torch.rand(work.shape[1:], generator=generator, dtype=work.dtype, device=work.device)
        keep = ((purity > draw) & (work > 0)) | ((purity < draw) & (work < 0))
        rate: Tensor | float = leak
        if isinstance(leak, Tensor):
            rate = leak.to(work.dtype).reshape(-1, *[1] * (work.dim() - 1))
        factor = rate + (1.0 - rate) * keep.to(work.dtype)
        return (factor * work).sum(0).to(block.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"n_tasks": self.n_tasks, "rng_state": generator_state(self._generator)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        set_generator_state(self._generator, state["rng_state"])
