"""FairGrad: alpha-fair resource allocation among the tasks."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..solvers.bargaining import bargaining_weights
from .base import Weighting, check_positive

#: Newton iterations of the solver. 20 reach round-off for alpha in [0.5, 2] on every test
#: case, degenerate and badly scaled ones included; further from 1 the potential is less
#: well-behaved and 40 are used (enough for alpha in [0.1, 10]).
ITERATIONS_NEAR_ONE = 20
ITERATIONS_FAR = 40


class FairGrad(Weighting):
    r"""FairGrad: the update that maximises the alpha-fair utility of the task improvements.

    Ban and Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024 (Section 4:
    the alpha-fair objective over the task improvements ``g_i^T d`` and its optimality
    condition; official code OptMN-Lab/fairgrad).

    The update is ``d = J^T w`` with ``w > 0`` solving ``G w = w^(-1/alpha)`` element-wise,
    so every task improves (``g_i^T d = w_i^(-1/alpha) > 0``). ``alpha -> 0`` tends to the
    utilitarian (sum) solution, ``alpha = 1`` is proportional fairness (the Nash-MTL system
    without its norm clipping), ``alpha -> inf`` max-min fairness. The references solve the
    system with ``scipy.optimize.least_squares`` from ``w = 1/m``; mtlopt solves it exactly in
    torch (:func:`mtlopt.solvers.bargaining.bargaining_weights`: Newton's method with a line
    search on the convex potential ``1/2 w^T G w - sum_i h(w_i)``, ``h' = w^(-1/alpha)``).

    Conventions: the update is ``w^T J`` as in the paper and LibMTL. The official training
    code multiplies it by the number of tasks and then clips its norm to 1; for that, scale
    the learning rate and clip the shared parameters' gradient yourself. Degenerate inputs
    as in :class:`~mtlopt.weighting.nash_mtl.NashMTL`: a task with a zero gradient gets weight
    0, and a relative ridge of ``1e-10 G_ii`` keeps the weights finite when no update improves
    every task.

    Args:
        alpha: the fairness parameter (``> 0``); default 1.0 (official code and LibMTL).
    """

    needs = "gramian"
    solves_on_host = True

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__()
        self.alpha = check_positive("alpha", alpha)

    def hyperparameters(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        iterations = ITERATIONS_NEAR_ONE if 0.5 <= self.alpha <= 2.0 else ITERATIONS_FAR
        return bargaining_weights(gramian, 1.0 / self.alpha, iterations)
