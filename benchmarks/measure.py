"""Timing (interleaved round-robin, warm-up, medians), peak memory, weighting-only time."""

from __future__ import annotations

import random
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mtlopt import host_solve
from mtlopt.nosync import host_copies
from mtlopt.weighting.base import Weighting

from .contenders import Contender
from .methods import Method
from .workloads import MLP

Key = tuple[str, str]
_MARK_BYTES = 7_919_017  #: a size no step allocates
MAX_BURST = 8  #: steps per contender and round at most, in a burst


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Wait for the device before reading the clock (a no-op on the CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@dataclass
class RoundRobin:
    """Per contender: the step times in seconds; failures and warnings seen, as notes."""

    samples: dict[Key, list[float]] = field(default_factory=dict)
    failures: dict[Key, str] = field(default_factory=dict)
    warnings: dict[Key, str] = field(default_factory=dict)
    rounds: int = 0

    def median(self, key: Key) -> float | None:
        values = self.samples.get(key)
        return statistics.median(values) if values else None


def round_robin(
    contenders: list[Contender],
    device: torch.device,
    warmup: int,
    repeats: int,
    min_repeats: int,
    budget_s: float,
    seed: int = 0,
    clock: Callable[[], float] = time.perf_counter,
    burst_s: float = 0.0,
    max_burst: int = MAX_BURST,
    reference: Key | None = None,
) -> RoundRobin:
    """Step every contender once per round, in a fresh random order each round, so that drift
    and neighbours hit all alike. After ``warmup`` untimed rounds, stop after ``repeats``
    rounds, or after ``min_repeats`` once ``budget_s`` seconds have passed. ``clock`` reads
    the step's duration (wall time by default; the budget is always wall time).

    ``burst_s``: within its turn, a contender takes several steps in a row, each timed, so
    that most samples follow a step of its own, as in a training loop. How many is fixed
    after the warm-up rounds (which step until ``burst_s`` seconds or ``max_burst`` steps):
    as many as fit in ``burst_s``, one at least, ``max_burst`` at most
    (:func:`burst_counts`). Every contender within :data:`COMPARABLE` times the
    ``reference``'s step takes the reference's count, so that the steps compared sit at the
    same positions in their bursts: the first steps of a burst run with colder caches (on
    the MLP at m = 10 the first takes 1.3x the fifth), and a count set by time gave a
    contender a few percent slower than the plain step one warm step fewer, which raised
    its median by a few percent. Without warm-up rounds the bursts are set by time.
    A step longer than ``burst_s`` is taken once a round."""
    sync = synchronizer(device)
    result = RoundRobin(samples={c.key: [] for c in contenders})
    warm: dict[Key, list[float]] = {c.key: [] for c in contenders}
    counts: dict[Key, int] = {}
    alive = list(contenders)
    order = random.Random(seed)
    started = time.perf_counter()
    for round_index in range(warmup + repeats):
        timed = round_index >= warmup
        if round_index == warmup:
            started = time.perf_counter()
            if warmup:
                counts = burst_counts(warm, burst_s, max_burst, reference)
        elif round_index - warmup >= min_repeats and time.perf_counter() - started > budget_s:
            break
        order.shuffle(alive)
        for contender in list(alive):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always" if round_index == 0 else "ignore")
                try:
                    if contender.key in counts:
                        elapsed = _steps(contender.step, sync, clock, counts[contender.key])
                    else:
                        elapsed = _burst(contender.step, sync, clock, burst_s, max_burst)
                except Exception as error:  # noqa: BLE001 - one broken contender: note, go on
                    result.failures[contender.key] = f"{type(error).__name__}: {error}"
                    result.samples.pop(contender.key, None)
                    alive.remove(contender)
                    continue
            if caught and contender.key not in result.warnings:
                result.warnings[contender.key] = str(caught[0].message).splitlines()[0]
            (result.samples if timed else warm)[contender.key].extend(elapsed)
        result.rounds = max(0, round_index + 1 - warmup)
    return result


#: Contenders whose warm step is at most this many times the reference's take its burst count.
COMPARABLE = 3.0


def burst_counts(
    warm: dict[Key, list[float]], burst_s: float, max_burst: int, reference: Key | None
) -> dict[Key, int]:
    """Steps per burst for each contender, from its warm-up step times (the very first step,
    which builds state, left out where there are others): as many as fit in ``burst_s``,
    between 1 and ``max_burst``; the ``reference``'s count for every contender within
    :data:`COMPARABLE` times the reference's step."""

    def fitting(seconds: float) -> int:
        if burst_s <= 0 or seconds <= 0:
            return 1
        return max(1, min(max_burst, int(burst_s / seconds + 1e-9)))

    times = {key: statistics.median(d[1:] or d) for key, d in warm.items() if d}
    counts = {key: fitting(seconds) for key, seconds in times.items()}
    if reference in times:
        for key, seconds in times.items():
            if seconds <= COMPARABLE * times[reference]:
                counts[key] = counts[reference]
    return counts


def _steps(
    step: Callable[[], None], sync: Callable[[], None], clock: Callable[[], float], count: int
) -> list[float]:
    return [_timed(step, sync, clock) for _ in range(count)]


def _burst(
    step: Callable[[], None],
    sync: Callable[[], None],
    clock: Callable[[], float],
    burst_s: float,
    max_burst: int,
) -> list[float]:
    """One contender's turn: the durations of its steps, one at least, more while they add
    up to less than ``burst_s`` and number fewer than ``max_burst``."""
    durations: list[float] = []
    while not durations or (sum(durations) < burst_s and len(durations) < max_burst):
        durations.append(_timed(step, sync, clock))
    return durations


def _timed(call: Callable[[], Any], sync: Callable[[], None], clock: Callable[[], float]) -> float:
    """The duration of one ``call``, the device synchronised before and after it."""
    sync()
    start = clock()
    call()
    sync()
    return clock() - start


def peak_bytes(step: Callable[[], None], device: torch.device) -> int | None:
    """Peak bytes allocated during one call of ``step`` above what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: torch's own allocator events, recorded by
    ``torch.profiler`` with ``profile_memory=True`` (every allocation and free of a tensor's
    storage, signed, in time order); the peak is the largest running sum. None if the
    profiler does not expose its events in this torch version.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    activities = [torch.profiler.ProfilerActivity.CPU]
    # (No warnings.catch_warnings here: resetting the filters makes profiled vmapped steps
    # several times slower.)
    with torch.profiler.profile(activities=activities, profile_memory=True) as profile:
        # The profiler cannot size a block allocated before it started, so its free goes
        # unrecorded (e.g. the .grad that zero_grad drops): profile a first step so that
        # every block the measured second step frees was allocated under the profiler. A
        # block of a size nothing else allocates marks where the second step starts
        # (record_function would slow the vmapped steps down).
        step()
        marker = torch.empty(_MARK_BYTES, dtype=torch.uint8)
        del marker
        step()
    try:
        events = profile.profiler.kineto_results.events()  # type: ignore[union-attr]
        memory = sorted(
            (e.start_ns(), e.nbytes())
            for e in events
            if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
        )
    except AttributeError:
        return None
    current, baseline, peak = 0, None, 0
    for _, nbytes in memory:
        current += nbytes
        if baseline is None:
            if nbytes == -_MARK_BYTES:  # the marker's free: the second step starts here
                baseline = peak = current
        else:
            peak = max(peak, current)
    return None if baseline is None else peak - baseline


def time_call(
    call: Callable[[], Any],
    repeats: int,
    sync: Callable[[], None] = lambda: None,
    budget_s: float = 1.0,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Median seconds of ``call`` (after one untimed call), at most ``budget_s`` in all."""
    call()
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < repeats and (len(samples) < 3 or time.perf_counter() - started < budget_s):
        samples.append(_timed(call, sync, clock))
    return statistics.median(samples)


@dataclass
class WeightingInput:
    """A real statistic for the weighting-only timing: the reference MLP's per-task gradients
    of its shared encoder at ``m`` tasks, their float64 Gramian and the loss values."""

    blocks: list[Tensor]
    gramian: Tensor
    losses: Tensor

    @classmethod
    def from_mlp(cls, n_tasks: int, device: torch.device) -> WeightingInput:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = MLP(n_tasks).to(device)
            generator = torch.Generator().manual_seed(1)
            x = torch.randn(256, 256, generator=generator).to(device)
            y = torch.randn(256, n_tasks, generator=generator).to(device)
        losses = torch.stack(model.losses(x, y))
        shared = model.shared_parameters()
        eye = torch.eye(n_tasks, device=device)
        blocks = list(torch.autograd.grad(losses, shared, eye, is_grads_batched=True))
        gramian = sum((b.reshape(n_tasks, -1) @ b.reshape(n_tasks, -1).T).double() for b in blocks)
        assert isinstance(gramian, Tensor)
        return cls(blocks, gramian, losses.detach().double())

    @property
    def matrix(self) -> Tensor:
        """The concatenated ``[m, n]`` Jacobian, as torchjd's ``jac_to_grad`` builds it."""
        return torch.cat([b.reshape(b.shape[0], -1) for b in self.blocks], 1)


def mtlopt_weighting_call(
    weighting: Weighting, data: WeightingInput
) -> tuple[Callable[[], Any], str]:
    """The weighting's own call on a fixed statistic, and what it is. Off the CPU a Gramian
    weighting that the optimizer runs on the host is timed that way: the Gramian's copy to
    the CPU, the weighting there, its weights' upload (:mod:`mtlopt.host_solve`)."""
    if weighting.needs == "gramian" and host_solve.wants_host_copy(weighting, data.gramian):
        return lambda: host_solve.weights_on(
            weighting, data.gramian, host_copies([data.gramian])[0], data.losses
        ), "weights_from_gramian(G.cpu()), uploaded"
    if weighting.needs == "gramian":
        return lambda: weighting.weights_from_gramian(
            data.gramian, data.losses
        ), "weights_from_gramian(G)"
    if weighting.needs == "jacobian":
        if type(weighting).weights_from_jacobian is not Weighting.weights_from_jacobian:
            return (
                lambda: weighting.weights_from_jacobian(data.blocks, data.losses),
                "weights_from_jacobian(blocks)",
            )
        masks = [(1 << data.losses.numel()) - 1] * len(data.blocks)
        return (
            lambda: weighting.update_from_jacobian(data.blocks, data.losses, masks),
            "update_from_jacobian(blocks)",
        )
    return lambda: weighting.loss_weights(data.losses), "loss_weights(losses)"


def torchjd_weighting_call(
    method: Method, data: WeightingInput
) -> tuple[Callable[[], Any], str] | None:
    """torchjd's counterpart on the same statistic (float32, as under ``jac_to_grad``)."""
    if method.torchjd is None or method.torchjd_kind != "aggregator":
        return None
    from torchjd.aggregation import GramianWeightedAggregator, WeightedAggregator

    aggregator = method.torchjd(data.losses.numel()).to(data.gramian.device)
    if isinstance(aggregator, GramianWeightedAggregator):
        gramian = data.gramian.float()
        return lambda: aggregator.gramian_weighting(gramian), "gramian_weighting(G)"
    matrix = data.matrix
    if isinstance(aggregator, WeightedAggregator):
        return lambda: aggregator.weighting(matrix), "weighting(J)"
    return lambda: aggregator(matrix), "aggregator(J)"
