"""Double-sampling methods: SDMGrad and MoDo read three mini-batches per step.

Both get ``gramians[p, q] = J_p J_q^T`` over the step's mini-batches: batch 0 (``zeta``) gives
the update ``d = w^T J_0``; batches 1 and 2 (``xi1``, ``xi2``) give the unbiased estimate
``J_xi1 J_xi2^T`` of ``J J^T`` that drives the weights. Called with a single Gramian
(:meth:`weights_from_gramian`), they use that batch in all three roles, as the SDMGrad
authors' multi-task experiments do.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..solvers.simplex import project_simplex
from ._rng import generator_state, new_generator, set_generator_state
from .base import (
    Weighting,
    check_non_negative,
    check_positive,
    check_positive_int,
    copy_tensor_state,
)

_ZETA, _XI1, _XI2 = 0, 1, 2


def _check_cross(gramians: Tensor, name: str) -> None:
    if gramians.dim() != 4 or gramians.shape[0] != gramians.shape[1] or gramians.shape[0] < 3:
        raise ValueError(
            f"{name} needs the cross Gramians of 3 mini-batches, shaped [3, 3, m, m]; "
            f"got shape {tuple(gramians.shape)}"
        )
    if gramians.shape[2] != gramians.shape[3]:
        raise ValueError(f"{name}: cross Gramians must be square, got {tuple(gramians.shape)}")


def _single_batch(gramian: Tensor) -> Tensor:
    """One batch in every role: ``gramians[p, q] = G`` for all ``p, q``."""
    m = gramian.shape[0]
    return gramian.expand(3, 3, m, m)


class SDMGrad(Weighting):
    r"""Stochastic Direction-oriented Multi-objective Gradient descent (SDMGrad, SDMGrad-OS).

    Xiao, Ban and Ji, "Direction-oriented Multi-objective Learning: Simple and Provable
    Stochastic Algorithms", NeurIPS 2023 (Algorithm 1; Algorithm 2 for objective sampling;
    code OptMN-Lab/sdmgrad).

    The weights ``w`` (on the simplex, warm-started from the previous step, ``1/m`` at first)
    minimise the direction-oriented objective
    ``1/2 ||J^T w + lmbda g0||^2``, ``g0 = J^T 1/m`` (the mean gradient), by ``niter`` steps
    of projected SGD with heavy-ball momentum (a fresh momentum buffer every step, as the
    authors re-create their ``torch.optim.SGD`` each step)::

        A      = J_xi1 J_xi2^T / s                  (unbiased estimate of J J^T, normalised)
        grad_k = A w_k + lmbda A 1/m                (the objective's stochastic gradient)
        b_k    = momentum b_{k-1} + grad_k          (b_0 = grad_0)
        w_k+1  = Proj_simplex(w_k - lr b_k)

    and the update from the first batch is
    ``d = (J_zeta^T w + lmbda mean_i g_zeta,i) / (1 + lmbda)``, i.e. the weights
    ``(w + lmbda / m) / (1 + lmbda)`` on ``J_zeta``.

    Conventions (the references disagree):
        * The normaliser ``s`` is ``mean_i ||g_xi1,i|| * mean_i ||g_xi2,i||``. The authors'
          code uses one batch, ``s = (mean_i sqrt(||g_i||^2 + 1e-4))^2``; LibMTL's double-sampled
          version uses ``(mean_i sqrt(max(A_ii, 0)))^2 + 1e-8`` with ``A`` the cross product,
          whose diagonal can vanish or turn negative under noise. mtlopt's ``s`` equals the
          authors' on one batch up to their ``1e-4`` and ``1e-8``, which it drops so that the
          weights are exactly invariant to the scale of the gradients (``s = 1`` when a batch's
          gradients are all zero, then ``A = 0``).
        * Step on ``w``: the gradient ``A w + lmbda A 1/m`` with ``lr = 10`` and momentum 0.5,
          as in the authors' MT10 code (objective ``1/2 w^T A w + lmbda w^T A 1/m``). Their
          NYU-v2 / Cityscapes code differentiates twice that objective with ``lr = 10``; LibMTL
          uses the same gradient as mtlopt with ``lr = 5``.
        * ``lmbda = 0.3`` and ``niter = 20`` are the authors' and LibMTL's defaults.

    SDMGrad-OS (``n_sampled = n``): each step draws ``n`` of the ``m`` tasks uniformly without
    replacement from the weighting's own generator (checkpointed). The unsampled tasks'
    gradients count as zero in every batch (their rows and columns of ``A`` are zeroed, so
    their ``w`` entries get no gradient, and ``g0`` sums the sampled tasks only over ``m``),
    and the update is rescaled by ``m / n`` so that ``J_S = (m / n) diag(1_S) J`` is an
    unbiased estimate of ``J``; the returned weights are
    ``(m / n) 1_S * (w + lmbda / m) / (1 + lmbda)``, zero for unsampled tasks. This is the
    authors' ``sdmgrad_os`` (their MT10 code draws each task with probability ``n / m``,
    redrawing empty sets; mtlopt draws exactly ``n``, for which ``m / n`` is exactly
    unbiased). All the step's Jacobians are still computed by mtlopt: sampling changes the
    update, not the cost.

    Args:
        lmbda: weight of the mean-gradient direction (>= 0; 0 gives a stochastic MGDA).
        niter: projected SGD steps on ``w`` per step (>= 1).
        lr: step size of those steps (> 0).
        momentum: their heavy-ball momentum, in ``[0, 1)``.
        n_sampled: SDMGrad-OS's number of tasks sampled per step, or None for all (SDMGrad).
        seed: seed of the sampling generator (SDMGrad-OS only); None draws one from torch's
            global RNG at construction.

    State (per param group): ``w`` (float64 ``[m]``) and, for SDMGrad-OS, the generator state.
    """

    needs = "gramian"
    stateful = True
    n_batches = 3

    def __init__(
        self,
        lmbda: float = 0.3,
        niter: int = 20,
        lr: float = 10.0,
        momentum: float = 0.5,
        n_sampled: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.lmbda = check_non_negative("lmbda", lmbda)
        self.niter = check_positive_int("niter", niter)
        self.lr = check_positive("lr", lr)
        self.momentum = check_non_negative("momentum", momentum)
        if self.momentum >= 1.0:
            raise ValueError(f"momentum: expected a number in [0, 1), got {momentum!r}")
        self.n_sampled = None if n_sampled is None else check_positive_int("n_sampled", n_sampled)
        self.seed = seed
        self._generator = None if n_sampled is None else new_generator(seed)
        self.weights: Tensor | None = None

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "lmbda": self.lmbda,
            "niter": self.niter,
            "lr": self.lr,
            "momentum": self.momentum,
            "n_sampled": self.n_sampled,
            "seed": self.seed,
        }

    def _sample(self, m: int, device: torch.device) -> Tensor | None:
        """A float64 0/1 mask of the sampled tasks (SDMGrad-OS), or None."""
        if self.n_sampled is None or self._generator is None:
            return None
        keys = torch.rand(m, generator=self._generator, dtype=torch.float64)
        chosen = keys.argsort()[: self.n_sampled]
        mask = torch.zeros(m, dtype=torch.float64).index_fill_(0, chosen, 1.0)
        return mask.to(device)

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        return self.weights_from_cross_gramians(_single_batch(gramian), losses)

    def weights_from_cross_gramians(self, gramians: Tensor, losses: Tensor) -> Tensor:
        _check_cross(gramians, "SDMGrad")
        gramians = gramians.to(torch.float64)
        m, device = gramians.shape[-1], gramians.device
        self.check_n_tasks(m)
        if self.n_sampled is not None and self.n_sampled > m:
            raise ValueError(
                f"n_sampled: SDMGrad-OS samples {self.n_sampled} tasks per step, but there "
                f"are only {m} losses"
            )
        if self.weights is None:
            self.n_tasks = m
            self.weights = torch.full((m,), 1.0 / m, dtype=torch.float64, device=device)
        elif self.weights.device != device:
            self.weights = self.weights.to(device)
        mask = self._sample(m, device)
        cross = gramians[_XI1, _XI2]
        norms1 = gramians[_XI1, _XI1].diagonal().clamp(min=0).sqrt()
        norms2 = gramians[_XI2, _XI2].diagonal().clamp(min=0).sqrt()
        if mask is not None:
            cross = cross * mask.unsqueeze(1) * mask.unsqueeze(0)
            norms1, norms2 = norms1 * mask, norms2 * mask
        scale = norms1.mean() * norms2.mean()
        cross = cross / torch.where(scale > 0, scale, torch.ones_like(scale))
        towards_mean = self.lmbda * cross.mean(1)  # lmbda A 1/m
        w = self.weights
        buffer = torch.zeros_like(w)
        for _ in range(self.niter):
            buffer = self.momentum * buffer + (cross @ w + towards_mean)
            w = project_simplex(w - self.lr * buffer)
        self.weights = w
        applied = (w + self.lmbda / m) / (1.0 + self.lmbda)
        if mask is not None:
            applied = applied * mask * (m / self.n_sampled)  # type: ignore[operator]
        return applied

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "n_tasks": self.n_tasks,
            "weights": None if self.weights is None else self.weights.clone(),
        }
        if self._generator is not None:
            state["rng_state"] = generator_state(self._generator)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        weights = state["weights"]
        self.weights = None if weights is None else copy_tensor_state(None, weights, "weights")
        if self._generator is not None:
            set_generator_state(self._generator, state["rng_state"])


class MoDo(Weighting):
    r"""Multi-objective gradient with Double sampling (MoDo).

    Chen, Fernando, Ying and Chen, "Three-Way Trade-Off in Multi-Objective Learning:
    Optimization, Generalization and Conflict-Avoidance", NeurIPS 2023 (Algorithm 1; code
    heshandevaka/Trade-Off-MOL).

    With ``lambda`` on the simplex (``1/m`` at the start), each step::

        lambda <- Proj_simplex(lambda - gamma (J_xi1 J_xi2^T lambda + rho lambda))
        d       = J_zeta^T lambda

    ``J_xi1 J_xi2^T lambda`` is an unbiased estimate of the gradient of
    ``1/2 ||J^T lambda||^2`` (two independent batches); the update uses the new ``lambda`` and
    a third batch. Batch roles: the authors' code updates ``lambda`` with its first two
    batches and steps along the third; LibMTL likewise (``grads[0]``, ``grads[1]``, then
    ``grads[2]``). mtlopt's batch 0 (the one passed to ``step``) is the update batch
    ``zeta``; batches 1 and 2 are ``xi1`` and ``xi2``. The authors' two-batch variant
    (``d = lambda^T (J_xi1 + J_xi2) / 2``) is not implemented.

    No normalisation: ``gamma`` acts on raw gradient products, as in the paper, the authors'
    code and LibMTL, so it must suit the scale of the gradients (it is not scale-free).

    Args:
        gamma: step size of ``lambda`` (> 0); default ``1e-3`` (LibMTL; the authors' scripts
            tune it per problem).
        rho: l2 regularisation of the ``lambda`` subproblem (>= 0); default 0.1 (LibMTL).

    State (per param group): ``lambda`` (float64 ``[m]``).
    """

    needs = "gramian"
    stateful = True
    n_batches = 3

    def __init__(self, gamma: float = 1e-3, rho: float = 0.1) -> None:
        super().__init__()
        self.gamma = check_positive("gamma", gamma)
        self.rho = check_non_negative("rho", rho)
        self.lambd: Tensor | None = None

    def hyperparameters(self) -> dict[str, Any]:
        return {"gamma": self.gamma, "rho": self.rho}

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        return self.weights_from_cross_gramians(_single_batch(gramian), losses)

    def weights_from_cross_gramians(self, gramians: Tensor, losses: Tensor) -> Tensor:
        _check_cross(gramians, "MoDo")
        gramians = gramians.to(torch.float64)
        m, device = gramians.shape[-1], gramians.device
        self.check_n_tasks(m)
        if self.lambd is None:
            self.n_tasks = m
            self.lambd = torch.full((m,), 1.0 / m, dtype=torch.float64, device=device)
        elif self.lambd.device != device:
            self.lambd = self.lambd.to(device)
        lambd = self.lambd
        step = gramians[_XI1, _XI2] @ lambd + self.rho * lambd
        self.lambd = project_simplex(lambd - self.gamma * step)
        return self.lambd.clone()

    def state_dict(self) -> dict[str, Any]:
        return {
            "n_tasks": self.n_tasks,
            "lambd": None if self.lambd is None else self.lambd.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        lambd = state["lambd"]
        self.lambd = None if lambd is None else copy_tensor_state(None, lambd, "lambd")
