"""mtlopt against its peers: the same training step, interleaved in one process (issue 4).

Run (from the repository root; torchjd and matplotlib come with ``pip install -e ".[bench]"``):

    python -m benchmarks.step_time --out benchmarks/results.md      # full, a few minutes
    python -m benchmarks.step_time --quick                           # smoke run, seconds
    python -m benchmarks.step_time --device cuda --out benchmarks/results_cuda.md

Workloads (``benchmarks/workloads.py``): the MLP of issue 4 (Linear 256-512-512 + ReLU
encoder, m heads Linear(512, 1), batch 256, MSE), a small CNN on 3 x 32 x 32 inputs and a
2-layer Transformer encoder (d_model 64, seq 32), each with one regression head per task;
m in {2, 10, 40}. Contenders (``benchmarks/contenders.py``): ``plain`` (sum of the losses,
one backward), ``floor`` (one bare batched VJP of all m losses, the mean written to
``.grad``), ``floor-z`` (the same mean with torchjd's structure: each task's gradient of the
shared representation through its own head, then one batched VJP through the encoder),
``loop`` (m sequential ``autograd.grad`` calls + the same weighting, LibMTL's
way), ``torchjd`` (0.18: ``mtl_backward`` + ``jac_to_grad``, or a scalarizer for loss-only
methods), ``mtlopt`` (``MultiTaskOptimizer.step(losses)``) and ``mtlopt-rep``
(``step(losses, features=z)``). Every contender has its own copy of the same model, batch
and base optimizer (SGD, lr 1e-3) and its own weighting instance.

Timing: per (workload, m) every contender steps once per round, in a fresh random order each
round (drift and cache effects hit all alike), after untimed warm-up rounds; the figure is
the median step time. On CUDA the clock is read after ``torch.cuda.synchronize()``. On a
shared machine, ``--threads 1 --clock cpu`` times each step by the process's CPU time, which
other processes barely disturb (wall time at 2 threads, the issue's setting, is the default).

Memory: the peak of torch's allocator during one step (taken after the timing rounds, so
weightings' state already exists), minus the plain step's peak: the "extra" memory a
contender needs over ``sum(losses).backward()``. On CUDA it is
``torch.cuda.max_memory_allocated`` (reset before the step). On the CPU torch keeps no peak
counter, and process-level figures (RSS, tracemalloc) do not see torch's allocations
precisely (glibc caches freed blocks, tracemalloc ignores them), so the step runs once under
``torch.profiler.profile(profile_memory=True)``, which records every allocation and free of
a tensor's storage by torch's CPU allocator with its size and time; the peak is the largest
running sum of these signed sizes. It counts tensors only (not Python objects or allocator
slack), which is the quantity the issue's target compares with the Jacobian's bytes
(m x number of shared parameters x 4).

Weighting-only time: each method's own call (``weights_from_gramian`` on a fixed float64
Gramian, or ``weights_from_jacobian`` / ``update_from_jacobian`` on fixed per-task blocks)
on the reference MLP's real per-task gradients at m = 10 and 40, against torchjd's weighting
on the same statistic in float32 (its ``gramian_weighting(G)``, or ``weighting(J)`` on the
concatenated Jacobian for matrix-based ones).

Timings are only comparable within one run on a quiet machine: the header records the load
average at the start and the end of the run.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `mtlopt` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import report
from benchmarks.contenders import build_contenders, has_representation_mode, mtlopt
from benchmarks.measure import (
    COMPARABLE,
    MAX_BURST,
    WeightingInput,
    mtlopt_weighting_call,
    peak_bytes,
    round_robin,
    synchronizer,
    time_call,
    torchjd_weighting_call,
)
from benchmarks.methods import DEFAULT_METHODS, Method, resolve_methods, torchjd_available
from benchmarks.report import ConfigResult, WeightingTime
from benchmarks.workloads import WORKLOADS, parameter_count

#: How a step's duration is read: wall time, or the process's CPU time (all its threads).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK_TEXT = {"wall": "wall time", "cpu": "CPU time of the process (all its threads)"}


@dataclass
class BenchmarkReport:
    """Everything one run measured, and its markdown."""

    header: list[str]
    methods: list[Method]
    configs: list[ConfigResult]
    weighting_times: list[WeightingTime]
    notes: list[str] = field(default_factory=list)
    markdown: str = ""
    plot_path: str | None = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few repeats, small m")
    parser.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), default=None)
    parser.add_argument("--tasks", type=int, nargs="+", default=None, help="values of m")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--out", default=None, help="write the markdown here, the PNG beside it")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds at most")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds")
    parser.add_argument("--budget", type=float, default=None, help="seconds per (workload, m)")
    parser.add_argument(
        "--burst",
        type=float,
        default=None,
        help="seconds of consecutive steps per contender and round (default 0.02; 0: one step)",
    )
    parser.add_argument("--weighting-tasks", type=int, nargs="+", default=None)
    parser.add_argument("--chunk-size", type=int, default=2, help="chunked-memory row; 0: none")
    parser.add_argument("--no-torchjd", action="store_true", help="leave torchjd out")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall time (default), or the process's CPU time: with --threads 1 it is far less "
        "sensitive to other processes on a shared machine (CPU only)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    quick = args.quick
    args.workloads = args.workloads or list(WORKLOADS)
    args.tasks = args.tasks or ([2, 4] if quick else [2, 10, 40])
    args.repeats = args.repeats or (2 if quick else 15)
    args.warmup = args.warmup if args.warmup is not None else 1
    args.min_repeats = min(args.repeats, 2 if quick else 5)
    args.budget = args.budget if args.budget is not None else (2.0 if quick else 12.0)
    args.burst = args.burst if args.burst is not None else (0.0 if quick else 0.02)
    args.weighting_tasks = args.weighting_tasks or (args.tasks if quick else [10, 40])
    args.headline_rounds = 1 if quick else HEADLINE_ROUNDS
    args.headline = _headline_key(args.workloads, args.tasks)
    args.weighting_repeats = 5 if quick else 30
    return args


def machine_lines(args: argparse.Namespace, device: torch.device) -> list[str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(
                line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    what = f"{cpu}, {os.cpu_count()} CPUs visible, torch threads {args.threads}"
    if device.type == "cuda":
        what = f"{torch.cuda.get_device_name(device)} (host: {what})"
    line = (
        f"Device: {what}; {platform.system()} {platform.release()}, Python "
        f"{platform.python_version()}, torch {torch.__version__}, torchjd "
        f"{torchjd_available() or 'not installed'}."
    )
    return [line]


def load_line(start: tuple[float, ...], end: tuple[float, ...], threads: int) -> str:
    """The load averages around the run; the start figure tells whether other processes
    were competing for the cores (the end figure includes this run itself)."""
    text = f"Load average (1 min) at start {start[0]:.1f}, at end {end[0]:.1f} (this run included)"
    if start[0] > 0.5:
        return text + (
            ": other processes were using the CPU when the run started, so these timings "
            "are noisy; rerun on a quiet machine before quoting them."
        )
    return text + "."


def measure_config(
    workload_name: str, n_tasks: int, methods: list[Method], args: argparse.Namespace,
    device: torch.device, with_torchjd: bool, with_representation: bool, notes: list[str],
    warned: dict[str, list[str]],
) -> ConfigResult:  # fmt: skip
    workload = WORKLOADS[workload_name]
    torch.manual_seed(args.seed)
    template = workload.build(n_tasks).to(device)
    x, y = workload.batch(n_tasks, device)
    contenders, build_notes = build_contenders(
        template, x, y, methods, with_torchjd, with_representation
    )
    where = f"{workload_name}, m={n_tasks}"
    notes.extend(f"{where}: {note}" for note in build_notes)
    # The targets are judged on one config: it gets more rounds, for a steadier median.
    more = args.headline_rounds if (workload_name, n_tasks) == args.headline else 1
    timing = round_robin(
        contenders, device, args.warmup, args.repeats * more, args.min_repeats,
        args.budget * more, args.seed,
        clock=CLOCKS[args.clock], burst_s=args.burst, reference=("", "plain"),
    )  # fmt: skip
    for (method, kind), error in timing.failures.items():
        notes.append(f"{where}: {kind} {method} failed and was dropped: {error}")
    for (method, kind), message in timing.warnings.items():
        warned.setdefault(message, []).append(f"{where}: {kind} {method}".strip())
    memory = {c.key: peak_bytes(c.step, device) for c in contenders if c.key in timing.samples}
    n_shared = parameter_count(template.shared_parameters())
    config = ConfigResult(
        workload=workload_name,
        description=workload.description,
        n_tasks=n_tasks,
        n_shared=n_shared,
        jacobian_bytes=n_tasks * n_shared * 4,
        timing=timing,
        memory=memory,
    )
    chunked = next((m for m in methods if m.needs == "gramian"), None)
    if args.chunk_size > 0 and chunked is not None and args.chunk_size < n_tasks:
        contender = mtlopt(template, x, y, chunked, chunk_size=args.chunk_size)
        contender.step()  # warm-up: state and the engine's first-call work
        config.chunked = (chunked.name, args.chunk_size, peak_bytes(contender.step, device))
    return config


def weighting_times(methods: list[Method], args: argparse.Namespace, device: torch.device,
                    with_torchjd: bool, notes: list[str]) -> list[WeightingTime]:  # fmt: skip
    out = []
    sync = synchronizer(device)
    for n_tasks in args.weighting_tasks:
        data = WeightingInput.from_mlp(n_tasks, device)
        for method in methods:
            try:
                call, label = mtlopt_weighting_call(method.build(), data)
                ours = time_call(call, args.weighting_repeats, sync, clock=CLOCKS[args.clock]) * 1e3
            except Exception as error:  # noqa: BLE001 - noted
                notes.append(f"weighting-only {method.name} m={n_tasks}: mtlopt failed: {error!r}")
                continue
            entry = WeightingTime(method.name, n_tasks, ours, label)
            try:
                peer = torchjd_weighting_call(method, data) if with_torchjd else None
            except Exception as error:  # noqa: BLE001 - e.g. a missing optional solver
                notes.append(f"weighting-only {method.name} m={n_tasks}: torchjd: {error!r}")
                peer = None
            if peer is not None:
                try:
                    with warnings.catch_warnings():  # cvxpy's DPP notice, already noted
                        warnings.simplefilter("ignore")
                        seconds = time_call(
                            peer[0], args.weighting_repeats, sync, clock=CLOCKS[args.clock]
                        )
                    entry.torchjd_ms, entry.torchjd_call = seconds * 1e3, peer[1]
                except Exception as error:  # noqa: BLE001 - noted
                    notes.append(
                        f"weighting-only {method.name} m={n_tasks}: torchjd failed: {error!r}"
                    )
            out.append(entry)
    return out


LEGEND = (
    "Ratios: `x plain`, `x floor`, `x loop`, `x torchjd` divide mtlopt's median step time by "
    "that contender's (same workload, m and method). Extra memory: peak allocated during the "
    "step minus the plain step's peak, in MB, and as a multiple of the shared parameters' "
    "Jacobian (m x n float32). `rep`: representation mode, `step(losses, features=z)`."
)


def _burst_text(burst_s: float) -> str:
    if burst_s <= 0:
        return "One timed step per contender and round. "
    return (
        f"Per round, each contender takes a burst of steps, each timed: as many as fit in "
        f"{burst_s * 1e3:.0f} ms ({MAX_BURST} at most), counted from its warm-up steps, and "
        f"the plain step's count for every contender within {COMPARABLE:g}x the plain step "
        "(the compared steps then sit at the same positions in their bursts, the first ones "
        "running with colder caches); the median is over all these steps. "
    )


def render(result: BenchmarkReport, args: argparse.Namespace) -> str:
    lines = ["# Step time and memory: mtlopt against its peers", "", *result.header, ""]
    lines += [
        "Command: `python -m benchmarks.step_time " + " ".join(args.argv) + "`",
        "",
        f"Clock: {CLOCK_TEXT[args.clock]}. " + _burst_text(args.burst) + LEGEND,
        "",
    ]
    headline = _headline(result.configs)
    if headline is not None:
        lines += [
            f"## Targets of issue 4 (measured on {headline.workload}, m = {headline.n_tasks})",
            "",
            (
                f"This config ran {headline.timing.rounds} rounds (up to "
                f"{args.headline_rounds}x the rounds and time budget of the others), for "
                "steadier medians."
            ),
            "",
            *report.checks_table(report.checks(headline, result.methods, result.weighting_times)),
            "Across all measured configurations:",
            "",
            *report.all_configs_summary(result.configs, result.methods),
            "",
        ]
    lines += ["## Cost against m", "", *report.growth_lines(result.configs, result.methods), ""]
    lines += [report.GROWTH_EXPLANATION, ""]
    lines += ["## Step time and peak extra memory", ""]
    for config in result.configs:
        lines += report.config_table(config, result.methods)
    if result.weighting_times:
        lines += ["## Weighting-only time (reference MLP's per-task gradients)", ""]
        lines += report.weighting_table(result.weighting_times)
    if result.notes:
        lines += ["## Notes", "", *(f"- {note}" for note in result.notes), ""]
    return "\n".join(lines)


#: The headline config (the targets') runs this many times the rounds and budget of the others.
HEADLINE_ROUNDS = 3


def _headline(configs: list[ConfigResult]) -> ConfigResult | None:
    """The config :func:`_headline_key` names (issue 4's targets are judged on it)."""
    if not configs:
        return None
    return min(configs, key=lambda c: _off_headline(c.workload, c.n_tasks))


def _headline_key(workloads: list[str], tasks: list[int]) -> tuple[str, int] | None:
    """Issue 4 states its targets for the MLP at m = 10: that (workload, m), or the nearest
    one measured; known before the run, so that it can get more rounds."""
    if not workloads or not tasks:
        return None
    return min(((w, m) for w in workloads for m in tasks), key=lambda c: _off_headline(*c))


def _off_headline(workload: str, n_tasks: int) -> tuple[bool, int]:
    return (workload != "mlp", abs(n_tasks - 10))


def main(argv: list[str] | None = None) -> BenchmarkReport:
    """Run the benchmark; print the markdown; write it (and the PNG) if ``--out`` is given."""
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if device.type == "cuda" and args.clock == "cpu":
        raise SystemExit("--clock cpu: on CUDA only wall time (after synchronising) is meaningful")
    threads = torch.get_num_threads()
    load_start = os.getloadavg()
    started = time.perf_counter()
    try:
        torch.set_num_threads(args.threads)
        cuda = [device.index or torch.cuda.current_device()] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            result = _run(args, device)
    finally:
        torch.set_num_threads(threads)
    result.header.append(load_line(load_start, os.getloadavg(), args.threads))
    result.header.append(f"Total run time {time.perf_counter() - started:.0f} s.")
    result.markdown = render(result, args)
    print(result.markdown)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(result.markdown + "\n")
        if not args.no_plot:
            png = out.with_suffix(".png")
            message = report.plot(result.configs, result.methods, str(png))
            if message:
                print(message, file=sys.stderr)
            else:
                result.plot_path = str(png)
                print(f"wrote {out} and {png}", file=sys.stderr)
    return result


def _run(args: argparse.Namespace, device: torch.device) -> BenchmarkReport:
    methods, notes = resolve_methods(args.methods)
    with_torchjd = not args.no_torchjd and torchjd_available() is not None
    if not args.no_torchjd and not with_torchjd:
        notes.append('torchjd is not installed: no torchjd contender (pip install -e ".[bench]")')
    with_representation = has_representation_mode()
    if not with_representation:
        notes.append("this mtlopt has no representation mode (step(..., features=z)): no rep rows")
    configs = []
    warned: dict[str, list[str]] = {}  # message -> who warned it, where
    for workload in args.workloads:
        for n_tasks in args.tasks:
            began = time.perf_counter()
            configs.append(
                measure_config(
                    workload,
                    n_tasks,
                    methods,
                    args,
                    device,
                    with_torchjd,
                    with_representation,
                    notes,
                    warned,
                )
            )
            gc.collect()
            print(
                f"[{workload}, m={n_tasks}: {configs[-1].timing.rounds} rounds, "
                f"{time.perf_counter() - began:.1f} s]",
                file=sys.stderr,
            )
    for message, who in warned.items():
        notes.append(f"warned ({'; '.join(who)}): {message}")
    times = weighting_times(methods, args, device, with_torchjd, notes)
    return BenchmarkReport(machine_lines(args, device), methods, configs, times, notes)


if __name__ == "__main__":
    main()
