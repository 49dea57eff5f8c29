"""Gradient Vaccine (GradVac)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..nosync import upload
from ..solvers import host_linalg
from ._rng import generator_state, new_generator, random_orders, set_generator_state
from .base import Weighting, check_positive, check_unit_interval, copy_tensor_state
from .gradvac_host import HOST_MAX_TASKS, gradvac_sweeps


class GradVac(Weighting):
    r"""Gradient Vaccine: align every pair of task gradients towards an adaptive target cosine.

    Wang, Tsvetkov, Firat and Cao, "Gradient Vaccine: Investigating and Improving Multi-task
    Optimization in Massively Multilingual Models", ICLR 2021 (Algorithm 2, Eqs. 5-6).

    For each task ``i`` the corrected gradient ``g_i'`` starts at ``g_i``; the other tasks ``j``
    are visited in a random order and, with ``phi = cos(g_i', g_j)`` and the target
    ``phi_hat[i, j]``, whenever ``phi < phi_hat[i, j]``::

        g_i' += ||g_i'|| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2))
                / (||g_j|| sqrt(1 - phi_hat^2)) * g_j                      (Eq. 5)

    and for every visited pair ``phi_hat[i, j] <- (1 - beta) phi_hat[i, j] + beta phi``
    (Eq. 6, with the cosine measured before the correction). The update is ``sum_i g_i'``.

    Implementation: ``g_i' = sum_k C[i, k] g_k`` is tracked through its coefficients ``C``,
    so every dot product and norm comes from the Gramian ``G = J J^T`` (``C G``); the loop over
    ``i`` runs as one vectorised operation, leaving ``m - 1`` sequential sweeps (on the CPU
    with at most 32 tasks the sweeps run on Python floats instead, which is faster there:
    :mod:`mtlopt.weighting.gradvac_host`). The returned task weights are ``w = C.sum(0)``
    (``d = w^T J``).

    Args:
        beta: EMA rate of the target cosines. The paper's experiments use a small rate; the
            default ``0.01`` follows them (LibMTL and torchjd default to 0.5).
        eps: added to denominators (``1e-8``).
        seed: seed of the weighting's own generator for the random task order; ``None``
            draws one from torch's global RNG at construction, so ``torch.manual_seed`` makes
            runs reproducible. The generator state is part of the checkpoint.

    State (per param group): ``phi_hat`` (``m x m`` float64, zeros at start) and the generator
    state. With ``beta = 0`` the targets stay at zero and GradVac is PCGrad.
    """

    needs = "gramian"
    solves_on_host = True
    stateful = True

    def __init__(self, beta: float = 0.01, eps: float = 1e-8, seed: int | None = None) -> None:
        super().__init__()
        self.beta = check_unit_interval("beta", beta)
        self.eps = check_positive("eps", eps)
        self.seed = seed
        self._generator = new_generator(seed)
        self.phi_hat: Tensor | None = None

    def hyperparameters(self) -> dict[str, Any]:
        return {"beta": self.beta, "eps": self.eps, "seed": self.seed}

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        m = gramian.shape[0]
        if self.phi_hat is None:
            self.n_tasks = m
            self.phi_hat = torch.zeros(m, m, dtype=torch.float64, device=gramian.device)
        elif self.phi_hat.device != gramian.device:
            self.phi_hat = self.phi_hat.to(gramian.device)
        orders = upload(random_orders(self._generator, m), gramian.device)
        if host_linalg.reads_back(gramian) and m <= HOST_MAX_TASKS:
            weights, updated = gradvac_sweeps(
                gramian.tolist(), orders.tolist(), self.phi_hat.tolist(), self.beta, self.eps
            )
            self.phi_hat.copy_(torch.tensor(updated, dtype=torch.float64))
            return torch.tensor(weights, dtype=gramian.dtype)
        rows = torch.arange(m, device=gramian.device)
        coefficients = torch.eye(m, dtype=gramian.dtype, device=gramian.device)
        norms = gramian.diagonal().clamp(min=0).sqrt()
        # Everything that depends on the pair (i, j) alone is gathered once for all sweeps
        # (each pair is visited once per step): fewer small ops in the sequential loop.
        targets = self.phi_hat.gather(1, orders)
        sin_targets = (1.0 - targets**2).clamp(min=0).sqrt()
        norms_j = norms[orders]
        denominators = norms_j * sin_targets + self.eps
        measured = torch.empty_like(targets)
        for step in range(m - 1):
            j = orders[:, step]
            cg = coefficients @ gramian
            norm_i = (cg * coefficients).sum(1).clamp(min=0).sqrt()
            norm_j = norms_j[:, step]
            phi = (cg[rows, j] / (norm_i * norm_j + self.eps)).clamp(-1.0, 1.0)
            target = targets[:, step]
            sin_phi = (1.0 - phi**2).clamp(min=0).sqrt()
            coef = norm_i * (target * sin_phi - phi * sin_targets[:, step]) / denominators[:, step]
            # A zero gradient on either side has no direction to align with.
            apply = (phi < target) & (norm_i > 0) & (norm_j > 0)
            coefficients[rows, j] += torch.where(apply, coef, 0.0)
            measured[:, step] = phi
        self.phi_hat.scatter_(1, orders, (1.0 - self.beta) * targets + self.beta * measured)
        return coefficients.sum(0)

    def state_dict(self) -> dict[str, Any]:
        return {
            "n_tasks": self.n_tasks,
            "phi_hat": None if self.phi_hat is None else self.phi_hat.clone(),
            "rng_state": generator_state(self._generator),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        phi_hat = state["phi_hat"]
        self.phi_hat = None if phi_hat is None else copy_tensor_state(None, phi_hat, "phi_hat")
        set_generator_state(self._generator, state["rng_state"])
