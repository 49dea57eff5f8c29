"""Multiple-gradient descent algorithm (MGDA): the min-norm point of the gradients' hull."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..solvers.min_norm import min_norm_weights
from .base import Weighting

#: The gradient normalisations of Sener and Koltun's code (and LibMTL's ``mgda_gn``).
NORMALIZATIONS = ("none", "l2", "loss", "loss+")


def _safe(values: Tensor) -> Tensor:
    """``values`` where they are positive and finite, 1 elsewhere (no normalisation)."""
    return torch.where((values > 0) & torch.isfinite(values), values, torch.ones_like(values))


class MGDA(Weighting):
    r"""MGDA: the minimum-norm element of the convex hull of the task gradients.

    Sener and Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018
    (Eq. 3, after Desideri, "Multiple-gradient descent algorithm (MGDA) for multiobjective
    optimization", C. R. Acad. Sci. Paris 2012)::

        min_w || sum_i w_i g_i ||^2   s.t.  w_i >= 0,  sum_i w_i = 1            (Eq. 3)

    i.e. ``min_w w^T G w`` over the simplex. The paper solves it with Frank-Wolfe (Algorithm 2;
    two tasks in closed form, Algorithm 1) and the references stop early (LibMTL: 250
    iterations or a 1e-5 change; torchjd: 100 or a 1e-3 step); mtlopt solves it exactly
    (:func:`mtlopt.solvers.min_norm.min_norm_weights`: face enumeration for up to 11 tasks, an
    interior point beyond; float64, no host synchronisation). The min-norm point is unique;
    where the weights are not (duplicate or collinear gradients) a minimiser is returned.

    Gradient normalisation (the paper's Section 3 / appendix and their code,
    ``gradient_normalizers``): each ``g_i`` is divided by ``n_i`` before solving, with

    - ``"none"``: ``n_i = 1`` (Eq. 3 as written; the default here and LibMTL's ``mgda_gn``
      default);
    - ``"l2"``: ``n_i = ||g_i||``;
    - ``"loss"``: ``n_i = L_i``;
    - ``"loss+"``: ``n_i = L_i ||g_i||`` (the setting of the authors' sample configuration).

    A normaliser that is zero or not finite (a zero gradient, a zero loss) is replaced by 1.
    The loss normalisations assume positive losses; a negative loss uses ``|L_i|`` so the
    gradient keeps its direction. Mapping back: with ``a`` the solution for the normalised
    gradients, the update is ``sum_i a_i g_i / n_i`` as in LibMTL, so the weights returned on
    the unnormalised gradients are ``w_i = a_i / n_i``. (Sener and Koltun's training script
    instead multiplies the *unnormalised* losses by ``a_i``, i.e. steps along ``sum_i a_i g_i``,
    which differs unless all ``n_i`` are equal; mtlopt follows LibMTL, whose update is the
    min-norm point of the normalised gradients.)

    MGDA-UB (the paper's upper bound, Section 3.3 and Theorem 1: the same problem on the
    gradients with respect to the shared representation ``z`` instead of the shared
    parameters) is not a separate weighting: it is this weighting in the optimizer's
    representation mode, ``opt.step(losses, features=z)`` (LibMTL's ``rep_grad``). Task heads
    receive their own gradient. Stateless.

    Args:
        normalization: one of ``"none"`` (default), ``"l2"``, ``"loss"``, ``"loss+"``.
    """

    needs = "gramian"
    solves_on_host = True

    def __init__(self, normalization: str = "none") -> None:
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization: expected one of {list(NORMALIZATIONS)}, got {normalization!r}"
            )
        self.normalization = normalization

    def hyperparameters(self) -> dict[str, Any]:
        return {"normalization": self.normalization}

    def normalizers(self, gramian: Tensor, losses: Tensor) -> Tensor:
        """The ``n_i`` dividing each task gradient before the min-norm problem is solved."""
        if self.normalization == "none":
            return torch.ones(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)
        norms = _safe(gramian.diagonal().clamp(min=0).sqrt())
        loss_scale = _safe(losses.to(gramian).abs())
        if self.normalization == "l2":
            return norms
        if self.normalization == "loss":
            return loss_scale
        return loss_scale * norms  # "loss+"

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        if self.normalization == "none":  # Eq. 3 as written: no rescaled copies
            return min_norm_weights(gramian)
        normalizers = self.normalizers(gramian, losses)
        normalized = gramian / torch.outer(normalizers, normalizers)
        return min_norm_weights(normalized) / normalizers
