"""Conflict-Averse Gradient descent (CAGrad) and its imbalance-sensitive variant IMGrad."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..solvers import host_linalg
from ..solvers.cagrad import conflict_averse_weights
from ..solvers.cagrad_cpu import host_limits
from ..solvers.cagrad_host import cagrad_weights_on_host
from ..solvers.min_norm import min_norm_weights
from .base import Weighting

#: ``||g_w||`` below this fraction of the largest task-gradient norm counts as zero: the
#: direction ``g_w / ||g_w||`` is then undefined and the ``g_w`` term is dropped.
ZERO_DIRECTION = 1e-7


def check_non_negative(name: str, value: float) -> float:
    """Validate a finite hyperparameter ``>= 0`` and return it as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a non-negative number, got {type(value).__name__}")
    if not (value >= 0 and value < float("inf")):
        raise ValueError(f"{name}: expected a non-negative finite number, got {value!r}")
    return float(value)


def _normalised(gramian: Tensor) -> Tensor:
    """``G`` divided by its largest diagonal entry (unchanged if all zero): both methods are
    scale-free, and the largest task-gradient norm becomes 1."""
    gramian = gramian.to(torch.float64)
    largest = gramian.diagonal().amax()
    return gramian / torch.where(largest > 0, largest, torch.ones_like(largest))


def _norm(weights: Tensor, gramian: Tensor) -> Tensor:
    """``||w^T J||`` from the Gramian."""
    return (weights @ gramian @ weights).clamp(min=0).sqrt()


def _conflict_averse_update(
    gramian: Tensor, inner_radius: Tensor, outer_radius: Tensor, divisor: float
) -> Tensor:
    """Weights of ``(g_0 + outer_radius g_w / ||g_w||) / divisor`` where ``w`` minimises
    ``g_w^T g_0 + inner_radius ||g_w||`` over the simplex (``gramian`` normalised)."""
    m = gramian.shape[0]
    w = conflict_averse_weights(gramian, inner_radius)
    g_w_norm = _norm(w, gramian)
    usable = g_w_norm > ZERO_DIRECTION
    scale = torch.where(usable, outer_radius / torch.where(usable, g_w_norm, 1.0), 0.0)
    return (1.0 / m + scale * w) / divisor


class CAGrad(Weighting):
    r"""CAGrad: the best worst-case task improvement in a ball around the mean gradient.

    Liu, Liu, Jin, Stone and Liu, "Conflict-Averse Gradient Descent for Multi-task
    Learning", NeurIPS 2021 (Section 3.1 and Algorithm 1; the official code
    Cranial-XIX/CAGrad for ``rescale``).

    With ``g_0`` the mean gradient, CAGrad seeks ``max_d min_i g_i^T d`` subject to
    ``||d - g_0|| <= c ||g_0||``. Its dual over the simplex,

        w* = argmin_{w in simplex} g_w^T g_0 + sqrt(phi) ||g_w||,   phi = c^2 ||g_0||^2,

    (``g_w = J^T w``; from the Gramian ``g_w^T g_0 = w^T G 1 / m``) gives
    ``d = g_0 + sqrt(phi) / ||g_w*|| g_w*``. The dual is solved exactly in torch
    (:func:`mtlopt.solvers.cagrad.conflict_averse_weights`: a barrier path-following method
    with a final Newton polish, float64, fixed iteration count) instead of the references'
    ``scipy.optimize.minimize`` (LibMTL, the official code) or cvxpy (torchjd).

    The update is then divided according to ``rescale`` (official code): ``0`` none,
    ``1`` by ``1 + c^2`` (the default of the official code and LibMTL), ``2`` by ``1 + c``.
    The returned weights are ``(1/m + sqrt(phi) / ||g_w*|| w*) / divisor``.

    Conventions:

    * Mean scale: the paper and LibMTL use ``g_0`` = the mean gradient; the official NYUv2
      script multiplies the final update by the number of tasks (``m`` times this one).
      mtlopt follows the paper; scale the learning rate by ``m`` to match that script.
    * The references add ``1e-8`` inside several norms (``||g_0||``, ``sqrt(phi)``,
      ``||g_w||``), which is not scale-free; mtlopt solves the exact problem on the Gramian
      divided by its largest diagonal entry, so the weights do not depend on the gradients'
      scale.
    * When ``g_w* = 0`` (zero lies in the convex hull of the gradients and the minimum sits
      there, possible for ``c >= 1``) the direction ``g_w* / ||g_w*||`` is undefined. mtlopt
      then returns ``d = g_0 / divisor``, the limit of the official code's
      ``c / (||g_w|| + 1e-8) g_w`` at ``g_w = 0``; torchjd returns ``d = 0`` instead. The
      cut-off is ``||g_w*|| <= 1e-7`` times the largest task-gradient norm; with a Gramian
      computed in float32 it cannot resolve such cases and the direction is then as noisy as
      in the references.
    * ``c = 0`` gives plain gradient descent on the mean loss. ``c < 1`` is the paper's
      range for convergence to a minimum of the average loss; ``c >= 1`` puts ``d = 0``
      inside the ball, so the update never conflicts with any task.

    Args:
        c: radius of the ball relative to ``||g_0||`` (``>= 0``); default 0.4, the official
            NYUv2 setting (LibMTL defaults to 0.5; the paper's toy uses 0.5).
        rescale: ``0``, ``1`` (default) or ``2``, as above.

    Task heads receive their own gradient.
    """

    needs = "gramian"
    solves_on_host = True

    def __init__(self, c: float = 0.4, rescale: int = 1) -> None:
        super().__init__()
        self.c = check_non_negative("c", c)
        if isinstance(rescale, bool) or not isinstance(rescale, int) or rescale not in (0, 1, 2):
            raise ValueError(f"rescale: expected 0, 1 or 2, got {rescale!r}")
        self.rescale = int(rescale)

    def hyperparameters(self) -> dict[str, Any]:
        return {"c": self.c, "rescale": self.rescale}

    def divisor(self) -> float:
        """What the update is divided by: 1, ``1 + c^2`` or ``1 + c`` (``rescale`` 0, 1, 2)."""
        return (1.0, 1.0 + self.c**2, 1.0 + self.c)[self.rescale]

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        if host_linalg.on_host(gramian):
            found = cagrad_weights_on_host(
                gramian.to(torch.float64).tolist(),
                self.c,
                self.divisor(),
                ZERO_DIRECTION,
                host_limits(),
            )
            if found is not None:  # the same chain on Python floats (CPU, few tasks)
                return torch.tensor(found, dtype=torch.float64)
        gramian = _normalised(gramian)
        mean_norm = gramian.mean().clamp(min=0).sqrt()  # ||g_0||: 1^T G 1 / m^2
        radius = self.c * mean_norm
        return _conflict_averse_update(gramian, radius, radius, self.divisor())


class IMGrad(Weighting):
    r"""IMGrad: CAGrad whose trade-off follows the agreement of the mean and MGDA directions.

    Zhou, Liu, Zhao and Gong, "Injecting Imbalance Sensitivity for Multi-Task Learning",
    IJCAI 2025 (code: zzpustc/IMGrad, ``imgrad`` in ``nyuv2/utils.py``).

    With ``g_0`` the mean gradient and ``g_m`` the MGDA min-norm point of the convex hull of
    the gradients, ``rho = cos(g_0, g_m)`` (in ``[0, 1]``: ``g_m^T g_i >= ||g_m||^2`` for all
    ``i``, so ``g_m^T g_0 >= 0``) and ``c = alpha ||g_0||``::

        w* = argmin_{w in simplex} (1.5 - rho) g_w^T g_0 + rho c ||g_w||
        d  = (g_0 + c / ||g_w*|| g_w*) / (1 + alpha^2)

    The inner problem is CAGrad's with radius ``rho c / (1.5 - rho)`` and is solved by the
    same exact solver; ``g_m`` comes from :func:`mtlopt.solvers.min_norm.min_norm_weights`
    (the authors use the Frank-Wolfe MinNormSolver). The division by ``1 + alpha^2`` is the
    authors' ``rescale=1``, which their training script uses. The weights returned are
    ``(1/m + c / ||g_w*|| w*) / (1 + alpha^2)``.

    Conventions: as for :class:`CAGrad` (mean scale; the references' additive ``1e-8`` terms
    dropped, the Gramian normalised instead; the ``g_w`` term dropped when
    ``||g_w*|| <= 1e-7`` times the largest task-gradient norm). ``rho`` is taken as 0 when
    ``g_0`` or ``g_m`` is zero (the official code's ``cosine_similarity`` gives 0 there too);
    then ``w*`` minimises ``g_w^T g_0`` alone.

    Args:
        alpha: ``c = alpha ||g_0||`` (``>= 0``); default 0.8, the authors' NYUv2 and
            Cityscapes scripts.
    """

    needs = "gramian"
    solves_on_host = True

    def __init__(self, alpha: float = 0.8) -> None:
        super().__init__()
        self.alpha = check_non_negative("alpha", alpha)

    def hyperparameters(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        gramian = _normalised(gramian)
        m = gramian.shape[0]
        mean_norm = gramian.mean().clamp(min=0).sqrt()
        mgda = min_norm_weights(gramian)
        mgda_norm = _norm(mgda, gramian)
        defined = (mean_norm > ZERO_DIRECTION) & (mgda_norm > ZERO_DIRECTION)
        denominator = torch.where(defined, mean_norm * mgda_norm, 1.0)
        cosine = torch.where(defined, (gramian.sum(0) @ mgda) / m / denominator, 0.0)
        cosine = cosine.clamp(0.0, 1.0)
        c = self.alpha * mean_norm
        inner_radius = cosine * c / (1.5 - cosine)
        return _conflict_averse_update(gramian, inner_radius, c, 1.0 + self.alpha**2)
