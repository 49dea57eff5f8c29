"""Step time and page faults under glibc's default malloc settings and under tuned ones.

On Linux, glibc hands blocks above its mmap threshold straight back to the operating system
when they are freed, and trims the top of its heap; the next step then faults every page of
its large buffers in again (the Jacobian of an exact method is m x n floats, allocated each
step). ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` keep that memory in the
process. This script runs the same steps in two child processes, one with each setting, and
prints the median step time and the minor page faults per step:

    python -m benchmarks.allocator [--tasks 10] [--steps 100]

It measures the environment, not mtlopt: every contender, the plain step included, pays the
faults. The figures go into the README's performance tips.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

#: Values large enough that nothing a step frees goes back to the operating system.
TUNED = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**32)}
STEPS = ("plain", "exact", "representation")
ROOT = Path(__file__).resolve().parent.parent  #: the repository, where ``-m benchmarks`` resolves


def measure(n_tasks: int, steps: int, threads: int) -> dict[str, tuple[float, float]]:
    """Per step kind: (median ms, minor page faults per step), in this process."""
    import resource  # Unix only

    import torch

    from benchmarks import contenders
    from benchmarks.methods import Method
    from benchmarks.workloads import WORKLOADS
    from mtlopt.weighting import resolve

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    workload = WORKLOADS["mlp"]
    template = workload.build(n_tasks)
    x, y = workload.batch(n_tasks, torch.device("cpu"))
    weighting = resolve("IMTLG")
    method = Method("IMTLG", type(weighting), weighting.needs)
    built = {
        "plain": contenders.plain(template, x, y),
        "exact": contenders.mtlopt(template, x, y, method),
        "representation": contenders.mtlopt_rep(template, x, y, method),
    }
    results = {}
    for kind in STEPS:
        step = built[kind].step
        for _ in range(10):
            step()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        results[kind] = (statistics.median(times) * 1e3, faults / steps)
    return results


def main(argv: list[str] | None = None) -> dict[str, dict[str, tuple[float, float]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.tasks, args.steps, args.threads)))
        return {}
    command = [sys.executable, "-m", "benchmarks.allocator", "--child", "--tasks",
               str(args.tasks), "--steps", str(args.steps), "--threads", str(args.threads)]  # fmt: skip
    # The baseline is glibc's own behaviour: no malloc tunables, no preloaded allocator.
    default_env = {k: v for k, v in os.environ.items() if not _affects_malloc(k)}
    settings = {"glibc default": default_env, "tuned": {**default_env, **TUNED}}
    results = {}
    for name, env in settings.items():
        output = subprocess.run(
            command, check=False, env=env, cwd=ROOT, capture_output=True, text=True
        )
        if output.returncode != 0:
            raise RuntimeError(f"benchmarks.allocator ({name}) failed:\n{output.stderr}")
        results[name] = json.loads(output.stdout.strip().splitlines()[-1])
    print(f"MLP 256-512-512, m = {args.tasks}, IMTL-G, {args.threads} threads, median of "
          f"{args.steps} steps; tuned: " + " ".join(f"{k}={v}" for k, v in TUNED.items()))  # fmt: skip
    print(f"{'step':16s}" + "".join(f"{name:>28s}" for name in settings))
    for kind in STEPS:
        cells = "".join(
            f"{results[name][kind][0]:10.2f} ms {results[name][kind][1]:8.0f} faults"
            for name in settings
        )
        print(f"{kind:16s}{cells}")
    return results


def _affects_malloc(name: str) -> bool:
    return name.startswith("MALLOC_") or name in ("GLIBC_TUNABLES", "LD_PRELOAD")


if __name__ == "__main__":
    main()
