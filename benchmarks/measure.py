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
) -> RoundRobin:
    """Step every contender once per round, in a fresh random order each round, so that drift
    and neighbours hit all alike. After ``warmup`` untimed rounds, stop after ``repeats``
    rounds, or after ``min_repeats`` once ``budget_s`` seconds have passed. ``clock`` reads
    the step's duration (wall time by default; the budget is always wall time).

    ``burst_s``: within its turn, a contender keeps stepping (each step timed on its own)
    until its steps add up to ``burst_s`` seconds or ``max_burst`` steps. A 5 ms step then
    gives several samples a round, and most of them follow a step of its own, as in a
    training loop, rather than another contender's. In a trial on the 2-core benchmark
    machine (16 contenders, MLP at m = 10) the Mean/plain ratio read 1.062-1.067 in three
    runs with 20 ms bursts and 1.01-1.22 in four with one step a round; full harness runs
    still differ by a few percent from one to the next. A step longer than ``burst_s`` is
    taken once a round, as without bursts."""
    sync = synchronizer(device)
    result = RoundRobin(samples={c.key: [] for c in contenders})
    alive = list(contenders)
    order = random.Random(seed)
    started = time.perf_counter()
    for round_index in range(warmup + repeats):
        timed = round_index >= warmup
        if round_index == warmup:
            started = time.perf_counter()
        elif round_index - warmup >= min_repeats and time.perf_counter() - started > budget_s:
            break
        order.shuffle(alive)
        for contender in list(alive):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always" if round_index == 0 else "ignore")
                try:
                    elapsed = _burst(
                        contender.step, sync, clock, burst_s if timed else 0.0, max_burst
                    )
                except Exception as error:  # noqa: BLE001 - one broken contender: note, go on
                    result.failures[contender.key] = f"{type(error).__name__}: {error}"
                    result.samples.pop(contender.key, None)
                    alive.remove(contender)
                    continue
            if caught and contender.key not in result.warnings:
                result.warnings[contender.key] = str(caught[0].message).splitlines()[0]
            if timed:
                result.samples[contender.key].extend(elapsed)
        result.rounds = max(0, round_index + 1 - warmup)
    return result


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
