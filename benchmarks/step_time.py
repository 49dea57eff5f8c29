"""Step time of mtlopt against a plain ``sum(losses).backward()`` step and the exact-method floor.

Workload (issue 4's reference MLP): encoder Linear 256-512-512 with ReLU, m heads
Linear(512, 1), batch 256, MSE per task, SGD. Contenders, interleaved round-robin in one
process, with warm-up, reporting medians:

* ``plain``: ``sum(losses).backward(); step()`` - what a loss-only method should cost;
* ``floor``: one bare batched VJP of all m losses (``autograd.grad`` with
  ``is_grads_batched=True`` over every parameter), the mean written to ``.grad``, ``step()`` -
  the least an exact per-task-gradient method can cost;
* ``loop``: m sequential ``autograd.grad`` calls (LibMTL's way), mean written, ``step()``;
* ``mtlopt <Method>``: ``MultiTaskOptimizer.step(losses)``.

Run:  python benchmarks/step_time.py [--quick] [--tasks 2 10] [--out benchmarks/results.md]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from mtlopt import MultiTaskOptimizer
from mtlopt.weighting import IMTL, IMTLG, IMTLL, ExcessMTL, GradVac, Mean


class MLP(nn.Module):
    def __init__(self, n_tasks: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(512, 1) for _ in range(n_tasks))

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        z = self.encoder(x)
        return [nn.functional.mse_loss(h(z).squeeze(-1), y[:, t]) for t, h in enumerate(self.heads)]


def contenders(n_tasks: int) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    x, y = torch.randn(256, 256), torch.randn(256, n_tasks)
    runs: dict[str, Callable[[], None]] = {}

    def plain() -> Callable[[], None]:
        net = MLP(n_tasks)
        opt = torch.optim.SGD(net.parameters(), lr=1e-3)

        def step() -> None:
            opt.zero_grad()
            sum(net.losses(x, y)).backward()
            opt.step()

        return step

    def floor(batched: bool) -> Callable[[], None]:
        net = MLP(n_tasks)
        params = list(net.parameters())
        opt = torch.optim.SGD(params, lr=1e-3)
        eye = torch.eye(n_tasks)

        def step() -> None:
            opt.zero_grad()
            losses = torch.stack(net.losses(x, y))
            if batched:
                grads = torch.autograd.grad(losses, params, eye, is_grads_batched=True)
            else:
                per_task = [
                    torch.autograd.grad(losses[i], params, retain_graph=i < n_tasks - 1)
                    for i in range(n_tasks)
                ]
                grads = [torch.stack(parts) for parts in zip(*per_task)]
            for p, g in zip(params, grads):
                p.grad = g.mean(0)
            opt.step()

        return step

    def wrapped(weighting) -> Callable[[], None]:  # noqa: ANN001
        net = MLP(n_tasks)
        base = torch.optim.SGD(net.parameters(), lr=1e-3)
        opt = MultiTaskOptimizer(base, weighting=weighting)

        def step() -> None:
            opt.zero_grad()
            opt.step(net.losses(x, y))

        return step

    runs["plain sum().backward()"] = plain()
    runs["floor (bare batched VJP)"] = floor(batched=True)
    runs["loop of m autograd.grad"] = floor(batched=False)
    for weighting in (Mean(), IMTLL(), GradVac(), IMTLG(), IMTL(), ExcessMTL()):
        runs[f"mtlopt {type(weighting).__name__}"] = wrapped(weighting)
    return runs


def measure(runs: dict[str, Callable[[], None]], repeats: int, warmup: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(warmup + repeats):
        for name, step in runs.items():  # round-robin: drift hits every contender alike
            start = time.perf_counter()
            step()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats (smoke run)")
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 10])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the table as markdown here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats, warmup = (3, 1) if args.quick else (30, 5)

    lines = [
        f"CPU, {args.threads} threads, torch {torch.__version__}, MLP 256-512-512, batch 256; "
        f"median of {repeats} steps",
        "",
        "| contender | " + " | ".join(f"m={m} ms | x plain | x floor" for m in args.tasks) + " |",
        "|---|" + "---:|---:|---:|" * len(args.tasks),
    ]
    results = {m: measure(contenders(m), repeats, warmup) for m in args.tasks}
    for name in results[args.tasks[0]]:
        cells = []
        for m in args.tasks:
            r = results[m]
            plain, floor = r["plain sum().backward()"], r["floor (bare batched VJP)"]
            cells.append(f"{r[name] * 1e3:.1f} | {r[name] / plain:.2f} | {r[name] / floor:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(table + "\n")


if __name__ == "__main__":
    main()
