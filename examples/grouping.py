"""GradVac at the four granularities of its paper, on the two-digit canvases.

Wang et al. ("Gradient Vaccine", ICLR 2021, Section 4.2) apply their correction to the whole
model at once, per network (encoder / decoder), per layer or per parameter matrix. In mtlopt
every param group of the base optimizer is one aggregation group with its own GradVac state
(target cosines, random stream), so the granularity is just how the groups are built; the
helpers of ``mtlopt.grouping`` build them from a module:

=============  ===============================================  ==============================
paper          helper                                           groups here
=============  ===============================================  ==============================
whole model    ``together(model)``                              1
per network    ``per_network(model.trunk, model.neck, heads)``  conv trunk, dense neck, heads
per layer      ``per_layer(model)``                             one per module with parameters
per tensor     ``per_tensor(model)``                            one per weight or bias
=============  ===============================================  ==============================

The model, data and training loop are those of ``multidigits.py``. The task heads are each
reached by one loss, so in every strategy they get their own task's gradient; GradVac acts
on the groups holding shared parameters (the table counts both). Equal weighting (Mean) is
trained on the same batches for reference.

Run:  python examples/grouping.py            (a minute or two)
      python examples/grouping.py --quick    (seconds)
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from example_kit import ThreadCount, format_table, use_matplotlib_backend
from multidigits import (
    N_TASKS,
    TASK_NAMES,
    MultiDigitNet,
    Result,
    delta_m,
    format_cell,
    prepare_runs,
    train,
    training_parser,
)

from mtlopt import per_layer, per_network, per_tensor, together
from mtlopt.weighting import GradVac, Mean

STRATEGIES: dict[str, Callable[[MultiDigitNet], list[dict[str, Any]]]] = {
    "together": lambda model: together(model),
    "per network": lambda model: per_network(model.trunk, model.neck, model.heads),
    "per layer": lambda model: per_layer(model),
    "per tensor": lambda model: per_tensor(model),
}


def group_counts(strategy: Callable[[MultiDigitNet], list[dict[str, Any]]]) -> tuple[int, int]:
    """(groups, groups holding shared parameters) of ``strategy`` on a fresh network."""
    model = MultiDigitNet()
    shared = {id(p) for p in [*model.trunk.parameters(), *model.neck.parameters()]}
    groups = strategy(model)
    return len(groups), sum(any(id(p) in shared for p in g["params"]) for g in groups)


def plot(table: dict[str, list[Result]], out: Path, title: str, dpi: int) -> Path:
    plt = use_matplotlib_backend()
    labels = list(table)
    positions = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    width = 0.38
    for t in range(N_TASKS):
        values = [[r.accuracy[t] for r in table[k]] for k in labels]
        means = [statistics.fmean(v) for v in values]
        errors = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        ax.bar(positions + (t - 0.5) * width, means, width, yerr=errors, label=TASK_NAMES[t])
    low = min(r.accuracy[t] for runs in table.values() for r in runs for t in range(N_TASKS))
    ax.set_ylim(max(0.0, low - 5.0), 100.0)
    ax.set_ylabel("test accuracy (%)")
    ax.set_xticks(positions, labels, rotation=20, ha="right")
    ax.legend(ncol=N_TASKS, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.suptitle(title)
    fig.tight_layout()
    file = out / "grouping.png"
    fig.savefig(file, dpi=dpi)
    plt.close(fig)
    return file


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = training_parser(__doc__.splitlines()[0], "strategy")
    parser.add_argument("--beta", type=float, default=0.01, help="GradVac's beta (default 0.01)")
    args = parser.parse_args(argv)
    config, seeds, datasets = prepare_runs(args)
    progress = not args.no_progress
    print(
        f"GradVac(beta={args.beta}) by granularity; {config.n_train} train / {config.n_test} "
        f"test canvases, {config.epochs} epoch(s), Adam lr {config.lr:g}, seed(s) {seeds}"
    )

    runs: dict[str, tuple[Callable[[], Any], Callable[[MultiDigitNet], Any] | None]] = {
        "Mean (reference)": (Mean, None),
        **{
            f"GradVac {name}": (lambda: GradVac(beta=args.beta), strategy)
            for name, strategy in STRATEGIES.items()
        },
    }
    table: dict[str, list[Result]] = {}
    with ThreadCount(args.threads):
        for label, (factory, groups) in runs.items():
            table[label] = [
                train(factory, datasets[seed], config, seed, groups, progress, label)
                for seed in seeds
            ]

    base = table["Mean (reference)"]
    rows = []
    for label, results in table.items():
        strategy = STRATEGIES.get(label.removeprefix("GradVac "))
        n_groups, n_shared = group_counts(strategy) if strategy else (1, 1)
        cells = [format_cell([r.accuracy[t] for r in results]) for t in range(N_TASKS)]
        deltas = [delta_m(r.accuracy, b.accuracy) for r, b in zip(results, base)]
        rows.append(
            [
                label,
                n_groups,
                n_shared,
                *cells,
                format_cell(deltas, signed=True),
                format_cell([r.seconds_per_epoch for r in results], digits=1),
            ]
        )
    headers = [
        "run", "groups", "with shared", "left acc %", "right acc %", "Δm % vs Mean", "s/epoch",
    ]  # fmt: skip
    print()
    print(format_table(headers, rows, "<"))
    print("Δm: lower is better (negative: more accurate than Mean on average).")
    file = plot(
        table,
        args.out,
        f"GradVac granularity: {config.epochs} epoch(s), {len(seeds)} seed(s)",
        dpi=60 if args.quick else 110,
    )
    print(f"wrote {file}")
    return {"table": table, "files": [file]}


if __name__ == "__main__":
    main()
