"""DualProj: the (preference-weighted) mean gradient projected onto the dual cone."""

from __future__ import annotations

from torch import Tensor

from ..solvers.dual_cone import dual_cone_weights
from .upgrad import _PreferenceProjection


class DualProj(_PreferenceProjection):
    r"""DualProj: project the mean gradient onto the dual cone of the task gradients.

    From torchjd (Quinton and Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv
    2406.16232, 2024, where it is a baseline); the projection is the one of Lopez-Paz and
    Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017 (Eq. 11, its
    dual). With ``p`` the preference vector (default ``1/m``) the update is::

        d = pi_J(J^T p),   i.e.   w = argmin_{v >= p} v^T G v

    (the dual problem of the projection onto ``{d : J d >= 0}``, Quinton and Rey's
    Proposition 1), solved by :func:`mtlopt.solvers.dual_cone.dual_cone_weights`.

    Conditioning exactly as :class:`~mtlopt.weighting.upgrad.UPGrad` (torchjd's): the QP uses
    ``G / trace(G) + reg_eps I``, and a Gramian whose trace is below ``norm_eps`` counts as
    zero (then ``w = max(p, 0)``). Non-conflicting: ``g_i . d >= -reg_eps trace(G) w_i`` (the
    ridge's slack; ``J d >= 0`` up to round-off with ``reg_eps=0``).
    Unlike UPGrad it is not linear under scaling of a single gradient: one large gradient
    dominates the mean before the projection. Task heads receive their own gradient. Stateless.

    Args:
        pref_vector: the weights ``p`` of the combination that is projected (a 1-D tensor or a
            sequence of ``m`` finite numbers); ``None`` (default) means the mean, ``1/m`` each.
        norm_eps: trace threshold below which the Gramian counts as zero (``>= 0``, ``1e-4``).
        reg_eps: ridge added to the normalised Gramian (``>= 0``, default ``1e-4``).
    """

    solves_on_host = True

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        weights = self.weights_on_cpu(gramian, each_task=False)
        if weights is not None:
            return weights
        return dual_cone_weights(self.conditioned_gramian(gramian), self.preference(gramian))
