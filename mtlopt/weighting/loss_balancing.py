"""Loss-balancing weightings that read the loss values only: Constant, Random (RLW), GLS, DWA
and STCH. Each step costs one ordinary backward pass of ``sum_i c_i L_i``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..losses import host_values
from ..nosync import upload
from ._rng import generator_state, new_generator, set_generator_state
from .base import Weighting, check_positive, check_positive_int, copy_tensor_state

_FLOAT64_MAX = torch.finfo(torch.float64).max


# ----------------------------------------------------------------------------- shared checks
def check_non_negative_int(name: str, value: int) -> int:
    """Validate an integer hyperparameter ``>= 0``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected a non-negative int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name}: expected a non-negative int, got {value}")
    return value


def check_losses_above(
    losses: Tensor, bound: float | Sequence[float], who: str, strict: bool, requirement: str
) -> None:
    """Raise ValueError naming the tasks whose loss is not above ``bound`` (``> bound`` if
    ``strict``, else ``>=``): the methods that take the logarithm of the losses need it.
    ``requirement`` says what was expected (e.g. "positive losses"). Tested on the host,
    on the optimizer's own read of the loss values (no second wait on a GPU)."""
    numbers = host_values(losses)
    bounds = [float(bound)] * len(numbers) if isinstance(bound, (int, float)) else list(bound)
    tasks = [
        i
        for i, (value, floor) in enumerate(zip(numbers, bounds))
        if (value <= floor if strict else value < floor)
    ]
    if tasks:
        raise ValueError(
            f"losses: {who} needs {requirement} (it takes their logarithm), got "
            f"{[numbers[i] for i in tasks]} for task(s) {tasks}; nothing was changed"
        )


def _scaled_ratio(numerator: Tensor, denominator: Tensor, temperature: float) -> Tensor:
    """``numerator / denominator / temperature`` with ratio 1 where the denominator is 0,
    clipped to finite values (so that a softmax of it stays defined)."""
    safe = torch.where(denominator != 0, denominator, torch.ones_like(denominator))
    ratio = torch.where(denominator != 0, numerator / safe, torch.ones_like(numerator))
    return (ratio / temperature).clamp(-_FLOAT64_MAX, _FLOAT64_MAX)


# ----------------------------------------------------------------------------- Constant
class Constant(Weighting):
    r"""Fixed loss weights: the update is the gradient of ``sum_i c_i L_i``.

    Args:
        weights: one finite factor per task (a sequence of numbers or a 1-D tensor); the
            number of losses is checked against it at every call. Task heads get
            ``c_t grad L_t``.
    """

    needs = "losses"

    def __init__(self, weights: Sequence[float] | Tensor) -> None:
        super().__init__()
        if isinstance(weights, Tensor):
            if weights.dim() != 1:
                raise ValueError(
                    f"weights: expected a 1-D tensor, got shape {tuple(weights.shape)}"
                )
            values = [float(v) for v in weights.detach().cpu().tolist()]
        elif isinstance(weights, Sequence) and not isinstance(weights, (str, bytes)):
            values = []
            for index, value in enumerate(weights):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise TypeError(
                        f"weights[{index}]: expected a number, got {type(value).__name__}"
                    )
                values.append(float(value))
        else:
            raise TypeError(
                f"weights: expected a sequence of numbers or a 1-D tensor, "
                f"got {type(weights).__name__}"
            )
        if not values:
            raise ValueError("weights: expected one weight per task, got none")
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            raise ValueError(f"weights: expected finite numbers, got {values} (task(s) {bad})")
        self.weights = values
        self._on_device: dict[torch.device, Tensor] = {}

    def hyperparameters(self) -> dict[str, Any]:
        return {"weights": list(self.weights)}

    def loss_weights(self, losses: Tensor) -> Tensor:
        if losses.numel() != len(self.weights):
            raise ValueError(
                f"losses: {self!r} has {len(self.weights)} weights, got {losses.numel()} losses"
            )
        cached = self._on_device.get(losses.device)
        if cached is None:  # one host-to-device copy per device, not per step
            cached = torch.tensor(self.weights, dtype=torch.float64, device=losses.device)
            self._on_device[losses.device] = cached
        return cached.clone()


# ----------------------------------------------------------------------------- Random (RLW)
class Random(Weighting):
    r"""Random loss weighting (RLW): fresh random loss weights at every step.

    Lin, Ye, Zhang and Tsang, "Reasonable Effectiveness of Random Weighting: A Litmus Test
    for Multi-Task Learning", TMLR 2022 (RLW with the standard normal distribution, the
    paper's and LibMTL's default).

    Each committed step draws ``z ~ N(0, I_m)`` and uses the loss weights ``softmax(z)``,
    which sum to 1 as in the paper, LibMTL's RLW and torchjd's ``Random`` (so the step has
    the scale of :class:`~mtlopt.weighting.Mean`, not of ``Sum``; the paper's other sampling
    distributions are not offered).

    The sample comes from the weighting's own generator (seeded from torch's global RNG at
    construction unless ``seed`` is given, so ``torch.manual_seed`` reproduces runs; its state
    is part of the checkpoint; :meth:`spawn` derives a new stream for every param group).
    :meth:`loss_weights` must be pure, so it *peeks* at the next sample through a copy of
    the generator state, and :meth:`observe` (called once per committed step) advances the
    generator: calling ``loss_weights`` twice before a step returns the same weights.

    Args:
        seed: seed of the weighting's generator (``None``: drawn from torch's global RNG).
    """

    needs = "losses"
    stateful = True

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        self.seed = seed
        self._generator = new_generator(seed)

    def hyperparameters(self) -> dict[str, Any]:
        return {"seed": self.seed}

    @staticmethod
    def _draw(m: int, generator: torch.Generator) -> Tensor:
        return torch.softmax(torch.randn(m, generator=generator, dtype=torch.float64), 0)

    def loss_weights(self, losses: Tensor) -> Tensor:
        m = losses.numel()
        self.check_n_tasks(m)
        peek = torch.Generator()
        peek.set_state(self._generator.get_state())
        return upload(self._draw(m, peek), losses.device)

    def observe(self, losses: Tensor, after_step: bool) -> None:
        if after_step:
            return
        self.check_n_tasks(losses.numel())
        self.n_tasks = losses.numel()
        self._draw(self.n_tasks, self._generator)  # the sample this step used

    def state_dict(self) -> dict[str, Any]:
        return {"n_tasks": self.n_tasks, "rng_state": generator_state(self._generator)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        set_generator_state(self._generator, state["rng_state"])


# ----------------------------------------------------------------------------- GLS
class GLS(Weighting):
    r"""Geometric loss strategy: minimise the geometric mean of the losses.

    Chennupati, Sistu, Yogamani and Rawashdeh, "MultiNet++: Multi-Stream Feature Aggregation
    and Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019 (the total
    loss ``(prod_i L_i)^(1/m)``).

    mtlopt applies it as loss weights equal to the exact gradient of the geometric mean::

        c_i = d GM / d L_i = GM / (m L_i),    GM = exp(mean_j log L_j)

    computed in log space so that it cannot overflow or underflow (LibMTL backpropagates
    ``prod(L) ** (1/m)``, whose product can). The losses must be positive: a loss ``<= 0``
    raises ValueError before anything changes. Task heads get ``c_t grad L_t``.
    """

    needs = "losses"

    def loss_weights(self, losses: Tensor) -> Tensor:
        check_losses_above(losses, 0.0, "GLS", True, "positive losses")
        logs = losses.log()
        return (logs.mean() - logs).exp() / losses.numel()


# ----------------------------------------------------------------------------- DWA
class DWA(Weighting):
    r"""Dynamic Weight Average: weight each task by the rate its loss went down.

    Liu, Johns and Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019
    (Eq. 7)::

        c_i(t) = m exp(r_i(t-1) / T) / sum_j exp(r_j(t-1) / T),
        r_i(t-1) = L_i(t-1) / L_i(t-2)

    with ``c_i = 1`` for the first two periods. The paper's ``L_i(t)`` is the average loss of
    epoch ``t``; mtlopt has no epochs, so ``L_i(t)`` is the average over period ``t`` of
    ``period`` committed steps (``period`` = the steps of an epoch reproduces the paper).
    The default ``period = 1`` compares the last two steps' losses, which is noisier than an
    epoch average (Nash-MTL's code compares two sliding windows of 25 steps instead). The
    state (the running sum of the current period and the last two period averages) is updated
    in :meth:`observe` only. Weights sum to ``m``. Losses are assumed positive (a zero
    denominator counts as ratio 1).

    Args:
        temperature: ``T`` (the paper's and LibMTL's default 2.0).
        period: committed steps per averaging period (>= 1).
    """

    needs = "losses"
    stateful = True

    def __init__(self, temperature: float = 2.0, period: int = 1) -> None:
        super().__init__()
        self.temperature = check_positive("temperature", temperature)
        self.period = check_positive_int("period", period)
        self.period_sum: Tensor | None = None
        self.period_steps = 0
        self.last_average: Tensor | None = None  # L(t-1)
        self.previous_average: Tensor | None = None  # L(t-2)

    def hyperparameters(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "period": self.period}

    def loss_weights(self, losses: Tensor) -> Tensor:
        m = losses.numel()
        self.check_n_tasks(m)
        if self.previous_average is None or self.last_average is None:
            return torch.ones_like(losses)
        last = self.last_average.to(losses.device)
        scaled = _scaled_ratio(last, self.previous_average.to(losses.device), self.temperature)
        return m * torch.softmax(scaled, 0)

    def observe(self, losses: Tensor, after_step: bool) -> None:
        if after_step:
            return
        self.check_n_tasks(losses.numel())
        self.n_tasks = losses.numel()
        if self.period_sum is None:
            self.period_sum = torch.zeros_like(losses)
        self.period_sum = self.period_sum.to(losses.device) + losses
        self.period_steps += 1
        if self.period_steps == self.period:
            self.previous_average = self.last_average
            self.last_average = self.period_sum / self.period
            self.period_sum = torch.zeros_like(losses)
            self.period_steps = 0

    def state_dict(self) -> dict[str, Any]:
        def clone(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.clone()

        return {
            "n_tasks": self.n_tasks,
            "period_sum": clone(self.period_sum),
            "period_steps": self.period_steps,
            "last_average": clone(self.last_average),
            "previous_average": clone(self.previous_average),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.period_steps = int(state["period_steps"])
        self.period_sum = _load_optional(state, "period_sum")
        self.last_average = _load_optional(state, "last_average")
        self.previous_average = _load_optional(state, "previous_average")


def _load_optional(state: dict[str, Any], name: str) -> Tensor | None:
    value = state[name]
    return None if value is None else copy_tensor_state(None, value, name)


# ----------------------------------------------------------------------------- STCH
_STCH_EPS = 1e-20  # inside the logarithms, as in the authors' code
#: Floor of the nadir point: a task whose loss was ~0 over the whole averaging window would
#: otherwise divide by zero (the weights stay below about m 1e120).
_MIN_NADIR = 1e-100


class STCH(Weighting):
    r"""Smooth Tchebycheff scalarisation of the log-normalised losses.

    Lin, Zhang, Yang, Liu, Wang and Zhang, "Smooth Tchebycheff Scalarization for
    Multi-Objective Optimization", ICML 2024 (the smooth Tchebycheff scalarisation
    ``mu log sum_i exp(lambda_i (f_i - z*_i) / mu)``), as applied to multi-task learning in
    the authors' code (``Xi-L/STCH``, ``STCH_MTL``; also LibMTL's ``STCH``). The scalarised
    loss is::

        m mu log sum_i exp(u_i / mu),    u_i = log(L_i / nadir_i + 1e-20)

    i.e. the smooth Tchebycheff function of the objectives ``log(L_i / nadir_i)`` with
    uniform preferences, the ideal point at 0 in that space and the factor ``m`` of the code.
    mtlopt uses its exact gradient as loss weights::

        c_i = m softmax(u / mu)_i / (L_i + 1e-20 nadir_i)

    Warm-up, as in the authors' code: the first ``warmup_steps`` committed steps train on
    ``sum_i log(L_i + 1e-20)`` (``c_i = 1 / (L_i + 1e-20)``); the next ``nadir_steps``
    steps do the same and average their losses into the nadir point; STCH starts after them.
    The code counts epochs (4 warm-up epochs, then 1 averaging epoch); with ``E`` steps per
    epoch, ``warmup_steps = 4 E`` and ``nadir_steps = E`` reproduce it. The defaults (0 and
    1) take the first step's losses as the nadir. State updates happen in :meth:`observe`.
    Losses must be non-negative (a negative one raises ValueError). A nadir entry below
    1e-100 (a task whose loss stayed ~0 over the averaging window) is raised to 1e-100.

    Args:
        mu: smoothing parameter ``mu`` (> 0; the authors' default 1.0).
        warmup_steps: steps of log-loss warm-up before the nadir is measured (>= 0).
        nadir_steps: steps whose average loss is the nadir point (>= 1).
    """

    needs = "losses"
    stateful = True

    def __init__(self, mu: float = 1.0, warmup_steps: int = 0, nadir_steps: int = 1) -> None:
        super().__init__()
        self.mu = check_positive("mu", mu)
        self.warmup_steps = check_non_negative_int("warmup_steps", warmup_steps)
        self.nadir_steps = check_positive_int("nadir_steps", nadir_steps)
        self.steps = 0
        self.nadir_sum: Tensor | None = None
        self.nadir: Tensor | None = None

    def hyperparameters(self) -> dict[str, Any]:
        return {"mu": self.mu, "warmup_steps": self.warmup_steps, "nadir_steps": self.nadir_steps}

    def loss_weights(self, losses: Tensor) -> Tensor:
        self.check_n_tasks(losses.numel())
        check_losses_above(losses, 0.0, "STCH", False, "non-negative losses")
        if self.nadir is None:
            return 1.0 / (losses + _STCH_EPS)
        nadir = self.nadir.to(losses.device)
        normalised = torch.log(losses / nadir + _STCH_EPS)
        softmax = torch.softmax(normalised / self.mu, 0)
        return losses.numel() * softmax / (losses + _STCH_EPS * nadir)

    def observe(self, losses: Tensor, after_step: bool) -> None:
        if after_step:
            return
        self.check_n_tasks(losses.numel())
        self.n_tasks = losses.numel()
        self.steps += 1
        if self.nadir is not None or self.steps <= self.warmup_steps:
            return
        if self.nadir_sum is None:
            self.nadir_sum = torch.zeros_like(losses)
        self.nadir_sum = self.nadir_sum.to(losses.device) + losses
        if self.steps == self.warmup_steps + self.nadir_steps:
            self.nadir = (self.nadir_sum / self.nadir_steps).clamp(min=_MIN_NADIR)

    def state_dict(self) -> dict[str, Any]:
        return {
            "n_tasks": self.n_tasks,
            "steps": self.steps,
            "nadir_sum": None if self.nadir_sum is None else self.nadir_sum.clone(),
            "nadir": None if self.nadir is None else self.nadir.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.steps = int(state["steps"])
        self.nadir_sum = _load_optional(state, "nadir_sum")
        self.nadir = _load_optional(state, "nadir")
