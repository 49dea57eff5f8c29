"""Uncertainty weighting (UW): learnable homoscedastic-uncertainty loss weights."""

from __future__ import annotations

import math

from torch import Tensor

from .learned import LearnedPerTask


class UW(LearnedPerTask):
    r"""Uncertainty weighting: each task's loss is scaled by a learned precision.

    Kendall, Gal and Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
    Geometry and Semantics", CVPR 2018 (Eqs. 7 and 10).

    Each task has a log-variance ``s_i = log sigma_i^2`` (zeros at start). The objective is::

        sum_i exp(-s_i) L_i + s_i

    so the model's loss weights are ``c_i = exp(-s_i)`` and each ``s_i`` receives the gradient
    ``1 - exp(-s_i) L_i`` (written in closed form, no extra backward). The optimum is
    ``exp(s_i) = L_i``, i.e. ``c_i = 1 / L_i``.

    Factors: the paper's regression form (Eq. 7) is ``L_i / (2 sigma_i^2) + log sigma_i =
    (1/2)(exp(-s_i) L_i + s_i)``; its classification form (Eq. 10) is ``L_i / sigma_i^2 +
    log sigma_i = exp(-s_i) L_i + s_i / 2``. mtlopt uses one form for every task, twice the
    regression form (the form of most re-implementations; equal weights of 1 at the start,
    like :class:`~mtlopt.weighting.Sum`). LibMTL uses the regression form with ``s``
    starting at -0.5 (weights 0.82 at the start); Nash-MTL's and FAMO's code the regression
    form with ``s = 0`` (weights 0.5). All have the same optimum ``exp(s_i) = L_i``; they
    differ by a constant factor on the model's step (and on the scales' step). UW is
    :class:`~mtlopt.weighting.IMTLL` with ``s = -s_IMTL``.

    The log-variances are trained by the base optimizer as an extra param group that inherits
    its defaults (``lr`` overrides the learning rate), so LR schedulers and checkpoints cover
    them. The group exists from construction (empty until the number of tasks is known).
    Task heads get ``exp(-s_t) grad L_t``.

    Args:
        lr: learning rate of the log-variances' param group (default: the base optimizer's).
        n_tasks: create the log-variances at construction (otherwise on the first step).
    """

    needs = "losses"
    parameter_name = "log_variances"

    @property
    def log_variances(self) -> Tensor:
        """The learnable log-variances ``s`` (empty until the number of tasks is known)."""
        return self.parameter

    def precisions(self, losses: Tensor) -> Tensor:
        """``exp(-s)`` in float64 (ones before the log-variances exist)."""
        return self.step_terms(losses)[0]

    def loss_weights(self, losses: Tensor) -> Tensor:
        self.check_n_tasks(losses.numel())
        return self.precisions(losses)

    def terms(self, values: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        precisions = values.neg().exp()
        return precisions, 1.0 - precisions * losses

    def host_terms(
        self, values: list[float], losses: list[float]
    ) -> tuple[list[float], list[float]]:
        precisions = [math.exp(-s) for s in values]
        return precisions, [1.0 - c * loss for c, loss in zip(precisions, losses)]
