"""Byzantine-robust aggregation rules, with tasks in the role of workers: Krum, TrimmedMean."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Weighting


def _check_count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int >= {minimum}, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def krum_weights(gramian: Tensor, n_byzantine: int, n_selected: int) -> Tensor:
    """Multi-Krum's weights: ``1 / n_selected`` on the rows with the lowest scores.

    The score of row ``i`` sums its squared distances ``G_ii + G_jj - 2 G_ij`` to its
    ``k = m - n_byzantine - 2`` nearest other rows (``k`` clamped to ``[1, m - 1]``). Ties go to
    the lower index; at most ``m`` rows are selected.
    """
    m = gramian.shape[0]
    if m == 1:
        return torch.ones(1, dtype=gramian.dtype, device=gramian.device)
    largest = gramian.diagonal().amax()
    # Only the ranking matters: normalise so the distances are of order one at any scale.
    normalised = gramian / torch.where(largest > 0, largest, torch.ones_like(largest))
    norms = normalised.diagonal()
    squared = (norms.unsqueeze(0) + norms.unsqueeze(1) - 2.0 * normalised).clamp(min=0)
    squared = squared + torch.diag(torch.full_like(norms, torch.inf))  # a row is not its neighbour
    n_neighbours = min(max(m - n_byzantine - 2, 1), m - 1)
    scores = squared.sort(dim=1).values[:, :n_neighbours].sum(1)
    count = min(n_selected, m)
    chosen = scores.argsort(stable=True)[:count]
    weights = torch.zeros(m, dtype=gramian.dtype, device=gramian.device)
    return weights.index_fill(0, chosen, 1.0 / count)


class Krum(Weighting):
    r"""(Multi-)Krum: the average of the task gradients closest to their neighbours.

    Blanchard, El Mhamdi, Guerraoui and Stainer, "Machine Learning with Adversaries: Byzantine
    Tolerant Gradient Descent", NeurIPS 2017 (the Krum rule and its Multi-Krum variant).

    Each task gradient is a worker's vector. With ``f = n_byzantine``, the score of ``g_i`` is
    ``sum_{i -> j} ||g_i - g_j||^2`` over its ``m - f - 2`` nearest other gradients; Krum
    returns the gradient with the lowest score and Multi-Krum (``n_selected > 1``) the mean of
    the ``n_selected`` lowest-scored ones. The squared distances come from the Gramian
    (``||g_i - g_j||^2 = G_ii + G_jj - 2 G_ij``), so the weights are ``1 / n_selected`` on the
    selected tasks and 0 elsewhere.

    Conventions:
        * Scores sum *squared* distances, as in the paper; torchjd 0.18's ``Krum`` sums the
          distances themselves, which can rank differently. Ties go to the lower task index
          (a stable sort), so exact ties between different gradients depend on the task order;
          duplicate gradients tie harmlessly.
        * The paper's guarantee needs ``m > 2 f + 2``. With fewer tasks the rule is still
          applied, on what there is: the scores use ``max(1, m - f - 2)`` neighbours (all
          ``m - 1`` when ``m <= 3``), at most ``m`` tasks are selected, and a single task is
          its own update; the Byzantine resilience then does not hold. (torchjd raises below
          ``f + 3`` tasks; a step of mtlopt would rather degrade than fail mid-training.)

    Args:
        n_byzantine: ``f``, the number of task gradients that may be adversarial (>= 0).
        n_selected: how many lowest-scored gradients are averaged (>= 1; 1 is Krum).
    """

    needs = "gramian"
    solves_on_host = True

    def __init__(self, n_byzantine: int, n_selected: int = 1) -> None:
        super().__init__()
        self.n_byzantine = _check_count("n_byzantine", n_byzantine, 0)
        self.n_selected = _check_count("n_selected", n_selected, 1)

    def hyperparameters(self) -> dict[str, Any]:
        return {"n_byzantine": self.n_byzantine, "n_selected": self.n_selected}

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        return krum_weights(gramian, self.n_byzantine, self.n_selected)


def trimmed_mean(block: Tensor, trim_number: int) -> Tensor:
    """Coordinate-wise mean of ``block``'s rows after dropping the ``trim_number`` largest and
    smallest values of each coordinate (fewer if fewer than ``2 trim_number + 1`` rows)."""
    m = block.shape[0]
    trim = min(trim_number, (m - 1) // 2)
    ordered = block.sort(dim=0).values
    return ordered.narrow(0, trim, m - 2 * trim).mean(0)


class TrimmedMean(Weighting):
    r"""Coordinate-wise trimmed mean of the task gradients.

    Yin, Chen, Ramchandran and Bartlett, "Byzantine-Robust Distributed Learning: Towards
    Optimal Statistical Rates", ICML 2018 (the coordinate-wise trimmed mean).

    For every coordinate of every shared tensor, the ``trim_number`` largest and the
    ``trim_number`` smallest of the ``m`` task values are dropped and the rest averaged
    (torchjd's ``TrimmedMean(trim_number)``; the paper's trimming fraction ``beta`` is
    ``trim_number / m``). The update is not a combination ``w^T J`` of whole gradients, so
    there are no task weights (logged as None).

    Conventions:
        * A task that does not reach a shared tensor has a zero gradient there, and that zero
          takes part in the coordinate's ranking (it is the true partial derivative).
        * torchjd raises below ``2 trim_number + 1`` tasks; mtlopt trims
          ``min(trim_number, (m - 1) // 2)`` values from each side instead, so at least one
          value (two for even ``m``) remains and a step never fails on the task count.
        * The mean is taken in the gradients' dtype (as torchjd).

    Args:
        trim_number: values dropped from each end of every coordinate (>= 0; 0 is the mean).
    """

    needs = "jacobian"

    def __init__(self, trim_number: int) -> None:
        super().__init__()
        self.trim_number = _check_count("trim_number", trim_number, 0)

    def hyperparameters(self) -> dict[str, Any]:
        return {"trim_number": self.trim_number}

    def update_from_jacobian(
        self, jacobian: list[Tensor], losses: Tensor, masks: list[int]
    ) -> tuple[list[Tensor], Tensor | None]:
        return [trimmed_mean(block, self.trim_number) for block in jacobian], None
