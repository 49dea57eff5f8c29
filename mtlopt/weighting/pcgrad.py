"""Projecting Conflicting Gradients (PCGrad)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..nosync import upload
from ._rng import generator_state, new_generator, random_orders, set_generator_state
from .base import Weighting


class PCGrad(Weighting):
    r"""PCGrad: project each task gradient off the normal plane of every conflicting one.

    Yu, Kumar, Gupta, Levine, Hausman and Finn, "Gradient Surgery for Multi-Task Learning",
    NeurIPS 2020 (Algorithm 1).

    For each task ``i`` the projected gradient ``g_i^PC`` starts at ``g_i``; the other tasks
    ``j != i`` are visited in a random order and, whenever ``g_i^PC . g_j < 0``::

        g_i^PC <- g_i^PC - (g_i^PC . g_j / ||g_j||^2) g_j

    (``g_j`` is the original gradient). The update is ``d = sum_i g_i^PC``.

    Conventions where the references differ:

    * Sum, not mean: the paper's Algorithm 1 returns the sum, as do LibMTL, torchjd and the
      Nash-MTL repository's PCGrad (``reduction="sum"``); the CAGrad repository averages and
      then multiplies by the number of tasks, which is the sum again. To get the mean, scale
      the learning rate by ``1 / m``.
    * Every task draws its own order of the other tasks (the paper, torchjd); LibMTL shuffles
      all tasks including ``i`` itself, which can project ``g_i^PC`` against ``g_i``.
    * A task with a zero gradient has no normal plane and never triggers a projection.

    Implementation: ``g_i^PC = sum_k C[i, k] g_k`` is tracked through its coefficients ``C``
    (``C = I`` at start), so every inner product comes from the Gramian (``C G``); the ``m``
    tasks are processed together, leaving ``m - 1`` sequential sweeps. The weights are
    ``w = C.sum(0)`` (``d = w^T J``). This is GradVac with ``beta = 0``.

    Args:
        seed: seed of the weighting's own generator for the random orders; ``None`` draws one
            from torch's global RNG at construction, so ``torch.manual_seed`` makes runs
            reproducible. The generator state is part of the checkpoint and ``spawn`` derives
            a new stream for every further param group.
    """

    needs = "gramian"
    solves_on_host = True

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        self.seed = seed
        self._generator = new_generator(seed)

    def hyperparameters(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        m = gramian.shape[0]
        gramian = gramian.to(torch.float64)
        orders = upload(random_orders(self._generator, m), gramian.device)
        rows = torch.arange(m, device=gramian.device)
        coefficients = torch.eye(m, dtype=torch.float64, device=gramian.device)
        squared_norms = gramian.diagonal()
        for step in range(m - 1):
            j = orders[:, step]
            dot = (coefficients @ gramian)[rows, j]  # g_i^PC . g_j for every i at once
            norm_j = squared_norms[j]
            conflict = (dot < 0) & (norm_j > 0)
            safe_norm = torch.where(norm_j > 0, norm_j, torch.ones_like(norm_j))
            coefficients[rows, j] -= torch.where(conflict, dot / safe_norm, torch.zeros_like(dot))
        return coefficients.sum(0)

    def state_dict(self) -> dict[str, Any]:
        return {"n_tasks": self.n_tasks, "rng_state": generator_state(self._generator)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        set_generator_state(self._generator, state["rng_state"])
