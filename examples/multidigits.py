"""Two digits on one canvas, two tasks: which digit is on the left, which on the right.

A MultiMNIST-like problem built offline from scikit-learn's ``load_digits`` (1,797 real 8x8
handwritten digits, no download): two digits are pasted on a 12x12 canvas, the left one at
a random row offset 0-4 and column 0-1, the right one at row 0-4 and column 3-4, combined with
a pixel-wise maximum, so they overlap over 2 to 6 columns. Task 1 classifies the left digit,
task 2 the right one. The digit images are split into train and test images first (70/30,
stratified), so no test canvas contains a digit image seen in training.

One small CNN is shared by both tasks (two conv layers, one dense layer: the shared
parameters) with a linear head per task (task-specific: each head gets its own task's
gradient). Every method trains the same initial network on the same batches with Adam
(lr 3e-3) through ``MultiTaskOptimizer``; the table gives each task's test accuracy, Delta m
against equal weighting (Mean) and the training time per epoch.

Delta m (Maninis et al. 2019; Liu et al. 2021): the mean over tasks of the relative change
of each metric against the baseline, signed so that LOWER IS BETTER::

    Delta m = 100/T sum_t (-1)^{h_t} (M_t - M_base,t) / M_base,t   (h_t = 1: higher is better)

Accuracy is higher-is-better, so a negative Delta m means more accurate than Mean on average.
(LibMTL reports the opposite sign.) On a problem this small the differences between methods
are of the order of the seed-to-seed noise: use ``--seeds 3`` for means and spreads. The
example demonstrates the API, it is not a benchmark.

Run:  python examples/multidigits.py            (a few minutes on 2 cores)
      python examples/multidigits.py --quick    (seconds)
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from example_kit import (
    MethodSpec,
    ThreadCount,
    available_methods,
    base_parser,
    format_table,
    use_matplotlib_backend,
)
from torch import Tensor, nn
from tqdm import tqdm

from mtlopt import MultiTaskOptimizer
from mtlopt.weighting import Weighting

CANVAS = 12
N_TASKS = 2
TASK_NAMES = ("left digit", "right digit")
METHODS = (
    MethodSpec("Mean", "Mean"),
    MethodSpec("GradVac", "GradVac"),
    MethodSpec("IMTL", "IMTL"),
    MethodSpec("ExcessMTL", "ExcessMTL"),
    MethodSpec("MGDA", "MGDA"),
    MethodSpec("PCGrad", "PCGrad"),
    MethodSpec("CAGrad", "CAGrad"),
    MethodSpec("NashMTL", "NashMTL"),
    MethodSpec("UPGrad", "UPGrad"),
    MethodSpec("FAMO", "FAMO"),
    MethodSpec("UW", "UW"),
)


@dataclass
class Config:
    n_train: int = 10_000
    n_test: int = 4_000
    epochs: int = 5
    batch_size: int = 64
    lr: float = 3e-3

    @classmethod
    def quick(cls) -> Config:
        return cls(n_train=512, n_test=256, epochs=1)


@dataclass
class Data:
    x_train: Tensor  # [n, 1, 12, 12] float32 in [0, 1]
    y_train: Tensor  # [n, 2] int64
    x_test: Tensor
    y_test: Tensor


# ---------------------------------------------------------------------------- data
def _paste_pairs(
    images: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[Tensor, Tensor]:
    """``n`` canvases of two random digits from ``images`` ([k, 8, 8] in [0, 1])."""
    left, right = rng.integers(0, len(images), n), rng.integers(0, len(images), n)
    rows = rng.integers(0, 5, (n, 2))
    cols = np.stack([rng.integers(0, 2, n), rng.integers(3, 5, n)], axis=1)
    canvas = np.zeros((n, CANVAS, CANVAS), dtype=np.float32)
    for k in range(n):
        for side, index in enumerate((left[k], right[k])):
            r, c = rows[k, side], cols[k, side]
            window = canvas[k, r : r + 8, c : c + 8]
            np.maximum(window, images[index], out=window)
    targets = np.stack([labels[left], labels[right]], axis=1)
    return torch.from_numpy(canvas).unsqueeze(1), torch.from_numpy(targets).long()


def make_data(config: Config, seed: int) -> Data:
    """Train and test canvases from disjoint digit images (the split depends on ``seed``)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    train_images, test_images, train_labels, test_labels = train_test_split(
        images, digits.target, test_size=0.3, random_state=seed, stratify=digits.target
    )
    rng = np.random.default_rng(seed)
    x_train, y_train = _paste_pairs(train_images, train_labels, config.n_train, rng)
    x_test, y_test = _paste_pairs(test_images, test_labels, config.n_test, rng)
    return Data(x_train, y_train, x_test, y_test)


# ---------------------------------------------------------------------------- model
class MultiDigitNet(nn.Module):
    """Shared conv ``trunk`` and dense ``neck``, one linear head per task."""

    def __init__(self, width: int = 16, hidden: int = 64) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.neck = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * (CANVAS // 2) ** 2, hidden), nn.ReLU()
        )
        self.heads = nn.ModuleList(nn.Linear(hidden, 10) for _ in range(N_TASKS))

    def forward(self, x: Tensor) -> list[Tensor]:
        z = self.neck(self.trunk(x))
        return [head(z) for head in self.heads]


def task_losses(model: MultiDigitNet, x: Tensor, y: Tensor) -> list[Tensor]:
    return [nn.functional.cross_entropy(out, y[:, t]) for t, out in enumerate(model(x))]


@torch.no_grad()
def accuracies(model: MultiDigitNet, x: Tensor, y: Tensor, batch_size: int = 1024) -> list[float]:
    """Per-task accuracy in percent."""
    model.eval()
    correct = torch.zeros(N_TASKS)
    for start in range(0, len(x), batch_size):
        outputs = model(x[start : start + batch_size])
        for t, out in enumerate(outputs):
            correct[t] += (out.argmax(1) == y[start : start + batch_size, t]).sum()
    model.train()
    return (100.0 * correct / len(x)).tolist()


# ---------------------------------------------------------------------------- training
@dataclass
class Result:
    accuracy: list[float]  # per task, percent
    seconds_per_epoch: float
    n_groups: int
    weighting: str  # repr of the first group's weighting


ParamGroups = Callable[[MultiDigitNet], Iterable[Any]]


def train(
    weighting: Weighting | Callable[[], Weighting],
    data: Data,
    config: Config,
    seed: int,
    param_groups: ParamGroups | None = None,
    progress: bool = False,
    label: str = "",
) -> Result:
    """Train a fresh network (same initialisation and batches for every call with the same
    ``seed``) with ``weighting``; ``param_groups(model)`` builds the base optimizer's groups
    (default: one group with every parameter)."""
    torch.manual_seed(seed)
    model = MultiDigitNet()
    if not isinstance(weighting, Weighting):
        weighting = weighting()  # built after seeding: random methods get a fixed stream
    groups = list(param_groups(model)) if param_groups else list(model.parameters())
    opt = MultiTaskOptimizer(torch.optim.Adam(groups, lr=config.lr), weighting=weighting)
    batches = torch.Generator().manual_seed(seed)
    n = len(data.x_train)
    steps = (n + config.batch_size - 1) // config.batch_size
    elapsed = 0.0
    bar = tqdm(
        total=config.epochs * steps, disable=not progress, leave=False, desc=label, mininterval=0.5
    )
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=batches)
        begin = time.perf_counter()
        for start in range(0, n, config.batch_size):
            index = order[start : start + config.batch_size]
            x, y = data.x_train[index], data.y_train[index]
            opt.zero_grad()
            # A closure, so that FAMO can re-evaluate the batch after the step (the others
            # evaluate it once).
            opt.step(functools.partial(task_losses, model, x, y))
            bar.update()
        elapsed += time.perf_counter() - begin
    bar.close()
    n_groups = len([w for w in opt.weightings() if w is not None])
    return Result(
        accuracies(model, data.x_test, data.y_test),
        elapsed / config.epochs,
        n_groups,
        repr(opt.weightings()[0]),
    )


def delta_m(accuracy: Sequence[float], baseline: Sequence[float]) -> float:
    """Delta m in percent for higher-is-better metrics: lower is better, negative beats the
    baseline."""
    return 100.0 * sum(-(a - b) / b for a, b in zip(accuracy, baseline)) / len(baseline)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def format_cell(values: Sequence[float], digits: int = 2, signed: bool = False) -> str:
    """``mean`` or ``mean ± std`` of ``values``."""
    mean, std = _mean_std(values)
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return text if len(values) == 1 else f"{text} ± {std:.{digits}f}"


# ---------------------------------------------------------------------------- figure
def plot(table: dict[str, dict[str, list[float]]], out: Path, title: str, dpi: int) -> Path:
    """Per-task accuracy bars and Delta m bars; returns the file written."""
    plt = use_matplotlib_backend()
    labels = list(table)
    positions = np.arange(len(labels))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.9 * len(labels)), 6.5))
    width = 0.38
    for t in range(N_TASKS):
        means = [_mean_std(table[k][f"task{t}"])[0] for k in labels]
        errors = [_mean_std(table[k][f"task{t}"])[1] for k in labels]
        top.bar(positions + (t - 0.5) * width, means, width, yerr=errors, label=TASK_NAMES[t])
    low = min(min(table[k][f"task{t}"]) for k in labels for t in range(N_TASKS))
    top.set_ylim(max(0.0, low - 5.0), 100.0)
    top.set_ylabel("test accuracy (%)")
    top.set_xticks(positions, labels, rotation=30, ha="right")
    top.legend(ncol=N_TASKS, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.suptitle(title)
    deltas = [_mean_std(table[k]["delta_m"]) for k in labels]
    colors = ["tab:green" if d <= 0 else "tab:red" for d, _ in deltas]
    bottom.bar(positions, [d for d, _ in deltas], yerr=[e for _, e in deltas], color=colors)
    bottom.axhline(0.0, color="k", linewidth=0.8)
    bottom.set_ylabel("Δm vs Mean (%), lower is better")
    bottom.set_xticks(positions, labels, rotation=30, ha="right")
    fig.tight_layout()
    file = out / "multidigits.png"
    fig.savefig(file, dpi=dpi)
    plt.close(fig)
    return file


# ---------------------------------------------------------------------------- main
def training_parser(description: str, per: str) -> argparse.ArgumentParser:
    """The common options plus ``--epochs`` and ``--seeds`` (per method or strategy)."""
    parser = base_parser(description)
    parser.add_argument("--epochs", type=int, default=None, help=f"epochs per {per} (default 5)")
    parser.add_argument("--seeds", type=int, default=1, help=f"seeds per {per} (default 1)")
    return parser


def prepare_runs(args: argparse.Namespace) -> tuple[Config, list[int], dict[int, Any]]:
    """The configuration, the seeds and one data set per seed that ``args`` ask for."""
    config = Config.quick() if args.quick else Config()
    if args.epochs:
        config.epochs = args.epochs
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = [args.seed + k for k in range(args.seeds)]
    return config, seeds, {seed: make_data(config, seed) for seed in seeds}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = training_parser(__doc__.splitlines()[0], "method").parse_args(argv)
    config, seeds, datasets = prepare_runs(args)
    progress = not args.no_progress
    methods = available_methods(METHODS, args.methods)
    print(
        f"{config.n_train} train / {config.n_test} test canvases, {config.epochs} epoch(s) of "
        f"batch {config.batch_size}, Adam lr {config.lr:g}, seed(s) {seeds}"
    )

    results: dict[str, list[Result]] = {}
    with ThreadCount(args.threads):
        for spec, factory in methods:
            results[spec.label] = [
                train(factory, datasets[seed], config, seed, progress=progress, label=spec.label)
                for seed in seeds
            ]
    base = results.get("Mean")
    table: dict[str, dict[str, list[float]]] = {}
    for label, runs in results.items():
        entry = {f"task{t}": [r.accuracy[t] for r in runs] for t in range(N_TASKS)}
        entry["mean"] = [statistics.fmean(r.accuracy) for r in runs]
        entry["delta_m"] = (
            [delta_m(r.accuracy, b.accuracy) for r, b in zip(runs, base)] if base else []
        )
        entry["seconds"] = [r.seconds_per_epoch for r in runs]
        table[label] = entry

    headers = ["method", "left acc %", "right acc %", "mean acc %", "Δm % vs Mean", "s/epoch"]
    rows = [
        [
            label,
            format_cell(e["task0"]),
            format_cell(e["task1"]),
            format_cell(e["mean"]),
            format_cell(e["delta_m"], signed=True) if e["delta_m"] else "n/a",
            format_cell(e["seconds"], digits=1),
        ]
        for label, e in table.items()
    ]
    print()
    print(format_table(headers, rows, "<"))
    print(
        "Δm: mean over the two tasks of -(acc - acc_Mean) / acc_Mean x 100; LOWER IS BETTER "
        "(negative: more accurate than Mean)."
        + ("" if len(seeds) > 1 else " One seed: run --seeds 3 to see the spread.")
    )
    print("weightings: " + "; ".join(f"{k}: {v[0].weighting}" for k, v in results.items()))
    file = plot(
        table,
        args.out,
        f"Two-digit canvases: {config.epochs} epoch(s), {len(seeds)} seed(s)",
        dpi=60 if args.quick else 110,
    )
    print(f"wrote {file}")
    return {"table": table, "files": [file]}


if __name__ == "__main__":
    main()
