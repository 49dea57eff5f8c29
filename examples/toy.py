"""The two-task toy problem of the CAGrad, Nash-MTL and FAMO papers, solved with mtlopt.

The problem (Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS
2021; Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022; Liu et al., "FAMO:
Fast Adaptive Multitask Optimization", NeurIPS 2023) has one parameter ``x = (x1, x2)`` and
two losses (``eps = 5e-6``)::

    f1 = log(max(|0.5 (-x1 - 7) - tanh(-x2)|, eps)) + 6
    f2 = log(max(|0.5 (-x1 + 3) + tanh(-x2) + 2|, eps)) + 6
    c1 = max(tanh(x2 / 2), 0),   c2 = max(tanh(-x2 / 2), 0)
    f1_sq = ((-x1 + 7)^2 + 0.1 (-x2 - 8)^2) / 10 - 20
    f2_sq = ((-x1 - 7)^2 + 0.1 (-x2 - 8)^2) / 10 - 20
    L1 = 0.1 (c1 f1 + c2 f1_sq),   L2 = c1 f2 + c2 f2_sq

The factor 0.1 on L1 is Nash-MTL's and FAMO's (their ``--scale 0.1``; the CAGrad paper has
none): the two gradients then differ in scale, which separates the methods more. Every run
is Adam with lr 1e-3 (as in the papers' toy scripts) for 35,000 steps (Nash-MTL's count; FAMO uses
50,000) from the papers' starting points: CAGrad's (-8.5, 7.5), (-8.5, -5), (9, 9) and
Nash-MTL/FAMO's (-8.5, 7.5), (0, 0), (9, 9), (-7.5, -0.5), (9, -1). FAMO runs with the
settings of the authors' toy script: ``gamma=0`` and loss lower bounds (-2.1, -21).

The Pareto set: Pareto-stationary points satisfy ``a grad L1 + b grad L2 = 0`` with
``a + b = 1``; there (x2 < 0, so c1 = 0) ``x1 = 7 (a - b)`` and ``x2`` minimises
``tanh(-x2/2) (19.6 a b - 20 + 0.01 (x2 + 8)^2)``. So the set runs over ``x1`` in [-7, 7]
with ``x2`` from -8.3551 (at x1 = 0) to -8.4345 (at x1 = +-7): the papers draw it as the line
``x2 = -8.3552``. The table gives the distance to both. (Scaling a loss does not move the
Pareto set, only where a given weighting lands on it: the mean of the scaled losses ends at
x1 = -5.73.)

How the runs are made: through ``MultiTaskOptimizer`` (:func:`run_with_optimizer`) the
parameter is one ``nn.Parameter`` of 2 entries, reached by both losses, so it is shared and
gets the weighting's update. Stepping the optimizer costs 1-3 ms of Python per step, and
9 methods x 6 starts x 35,000 steps would take an hour or more, so by default the runs are
replayed in batch (:class:`BatchedRuns`): the same weighting classes and the same calls the
optimizer makes for one shared tensor, for every method and start at once (one forward and
backward pass, one Adam), in two processes on a 2-core machine. Before the long runs, each
method's replay is compared with ``MultiTaskOptimizer`` over the first 100 steps from every
start (the largest difference is printed; almost every run is identical to the bit);
``--engine optimizer`` runs everything through the optimizer instead.

Run:  python examples/toy.py            (a few minutes; figures in examples/figures/)
      python examples/toy.py --quick    (seconds)
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
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
from mtlopt.weighting.base import combine

LOSS_FLOOR = 5e-6
L1_SCALE = 0.1  # Nash-MTL and FAMO scale the first loss by 0.1
LR = 1e-3
STEPS = 35_000
QUICK_STEPS = 100
CHECK_STEPS = 100  # steps of every run compared with MultiTaskOptimizer
PAPERS_FRONT_X2 = -8.3552  # the line the papers draw as the Pareto front
STARTS = (
    (-8.5, 7.5),  # CAGrad, Nash-MTL, FAMO
    (-8.5, -5.0),  # CAGrad
    (9.0, 9.0),  # CAGrad, Nash-MTL, FAMO
    (0.0, 0.0),  # Nash-MTL, FAMO
    (-7.5, -0.5),  # Nash-MTL, FAMO
    (9.0, -1.0),  # Nash-MTL, FAMO
)
METHODS = (
    MethodSpec("Mean", "Mean"),
    MethodSpec("MGDA", "MGDA"),
    MethodSpec("PCGrad", "PCGrad"),
    MethodSpec("CAGrad(c=0.5)", "CAGrad", {"c": 0.5}),
    MethodSpec("Nash-MTL", "NashMTL"),
    MethodSpec("IMTL-G", "IMTLG"),
    MethodSpec("GradVac", "GradVac"),
    MethodSpec("FAMO", "FAMO", {"gamma": 0.0, "min_losses": [-21.0 * L1_SCALE, -21.0]}),
    MethodSpec("UPGrad", "UPGrad"),
)


# ---------------------------------------------------------------------------- the problem
def toy_losses(x: Tensor) -> Tensor:
    """``[L1, L2]`` at ``x = (x1, x2)`` (any leading batch dimensions): shape ``[..., 2]``."""
    x1, x2 = x[..., 0], x[..., 1]
    f1 = torch.clamp((0.5 * (-x1 - 7) - torch.tanh(-x2)).abs(), min=LOSS_FLOOR).log() + 6
    f2 = torch.clamp((0.5 * (-x1 + 3) + torch.tanh(-x2) + 2).abs(), min=LOSS_FLOOR).log() + 6
    c1 = torch.clamp(torch.tanh(x2 / 2), min=0)
    c2 = torch.clamp(torch.tanh(-x2 / 2), min=0)
    f1_sq = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    f2_sq = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    return torch.stack([L1_SCALE * (c1 * f1 + c2 * f1_sq), c1 * f2 + c2 * f2_sq], dim=-1)


def pareto_set(n: int = 2801) -> np.ndarray:
    """``n`` points ``(x1, x2)`` of the exact Pareto set (see the module docstring)."""
    x1 = np.linspace(-7.0, 7.0, n)
    a = (1.0 + x1 / 7.0) / 2.0
    offset = 19.6 * a * (1.0 - a) - 20.0

    def objective(x2: np.ndarray) -> np.ndarray:
        return np.tanh(-x2 / 2.0) * (offset + 0.01 * (x2 + 8.0) ** 2)

    low, high = np.full(n, -9.5), np.full(n, -7.5)  # unimodal there; golden-section search
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    for _ in range(80):
        left, right = high - ratio * (high - low), low + ratio * (high - low)
        smaller_left = objective(left) < objective(right)
        high = np.where(smaller_left, right, high)
        low = np.where(smaller_left, low, left)
    return np.stack([x1, (low + high) / 2.0], axis=1)


def distance_to_papers_front(x: np.ndarray) -> np.ndarray:
    """Distance of points ``[..., 2]`` to the segment ``x2 = -8.3552``, ``x1`` in [-7, 7]."""
    dx = x[..., 0] - np.clip(x[..., 0], -7.0, 7.0)
    return np.hypot(dx, x[..., 1] - PAPERS_FRONT_X2)


def distance_to_set(x: np.ndarray, curve: np.ndarray) -> np.ndarray:
    """Distance of points ``[k, 2]`` to the polyline through ``curve`` ``[n, 2]``."""
    start, segment = curve[:-1], np.diff(curve, axis=0)  # [n - 1, 2]
    offset = x[:, None, :] - start[None]  # [k, n - 1, 2]
    t = np.clip((offset * segment).sum(-1) / (segment**2).sum(-1), 0.0, 1.0)
    return np.linalg.norm(offset - t[..., None] * segment, axis=-1).min(1)


# ---------------------------------------------------------------------------- the runs
def build_weightings(factory: Callable[[], Weighting], n: int, seed: int) -> list[Weighting]:
    """``n`` fresh instances under a fixed seed: random methods (PCGrad, GradVac) seed their
    own generators from torch's, so both engines get the same random streams."""
    torch.manual_seed(seed)
    return [factory() for _ in range(n)]


def run_with_optimizer(
    weightings: Sequence[Weighting], starts: Tensor, steps: int, progress: bool = False
) -> Tensor:
    """Every start on its own: ``MultiTaskOptimizer(Adam([x]))`` for ``steps`` steps.

    Returns the trajectories ``[steps + 1, n_starts, 2]``.
    """
    trajectories = torch.empty(steps + 1, len(starts), 2)
    trajectories[0] = starts
    for index, (start, weighting) in enumerate(zip(starts, weightings)):
        x = nn.Parameter(start.clone())
        # The instance goes into the param group itself: MultiTaskOptimizer(base, weighting=w)
        # would hand the group a copy of w (w.spawn(), with its own random stream).
        base = torch.optim.Adam([{"params": [x], "weighting": weighting}], lr=LR)
        opt = MultiTaskOptimizer(base)
        for step in tqdm(range(steps), disable=not progress, leave=False, desc=f"start {index}"):
            opt.zero_grad()
            # A closure: FAMO then learns from the loss after the step, as in the paper.
            opt.step(functools.partial(toy_losses, x))
            trajectories[step + 1, index] = x.detach()
    return trajectories


def _direction(weighting: Weighting, jacobian: Tensor, losses: Tensor) -> Tensor:
    """What ``MultiTaskOptimizer`` writes to the ``.grad`` of one shared tensor."""
    factors = weighting.loss_weights(losses)
    if weighting.needs == "losses":
        return combine(factors, jacobian)
    if factors is not None:
        jacobian = jacobian * factors.to(jacobian.dtype).unsqueeze(-1)
    if weighting.needs == "gramian":
        gramian = (jacobian @ jacobian.T).to(torch.float64)
        return combine(weighting.weights_from_gramian(gramian, losses), jacobian)
    updates, _ = weighting.update_from_jacobian([jacobian], losses, [0b11])
    return updates[0]


def batch_supported(weighting: Weighting) -> bool:
    """Whether :class:`BatchedRuns` can replay the optimizer for this weighting."""
    learns = type(weighting).learnable_parameters is not Weighting.learnable_parameters
    return weighting.n_batches == 1 and not learns


class _Replay:
    """One method's weightings (one per start): the calls the optimizer makes on them."""

    def __init__(self, weightings: Sequence[Weighting]) -> None:
        if not all(batch_supported(w) for w in weightings):
            raise ValueError(f"{weightings[0]!r}: learnable tensors or several batches per step")
        self.weightings = list(weightings)
        first = self.weightings[0]
        self.observes = type(first).observe is not Weighting.observe
        self.after_step = first.wants_losses_after_step
        self.vmapped: Callable[[Tensor, Tensor], Tensor] | None = None
        if not first.stateful and not self.observes:
            self.vmapped = torch.vmap(functools.partial(_direction, first))

    def directions(self, jacobians: Tensor, losses: Tensor) -> Tensor:
        if self.vmapped is not None:
            try:
                return self.vmapped(jacobians, losses)
            except (RuntimeError, NotImplementedError):  # vmap cannot batch an op: loop
                self.vmapped = None
        rows = [_direction(w, j, v) for w, j, v in zip(self.weightings, jacobians, losses)]
        return torch.stack(rows)

    def observe(self, losses: Tensor, after_step: bool) -> None:
        for weighting, value in zip(self.weightings, losses):
            weighting.observe(value, after_step=after_step)


class BatchedRuns:
    """The runs of several methods from every start, as one program over a ``[M, S, 2]``
    parameter (M methods, S starts).

    Per step, method and start, it makes the calls ``MultiTaskOptimizer.step(closure)`` makes
    for one shared tensor: ``loss_weights``, then ``weights_from_gramian`` on ``J J^T`` (or the
    Jacobian path), ``observe`` before the base step and, for weightings that want it, after
    it. Adam is element-wise, so one Adam over the whole parameter is M x S independent ones,
    and one forward and backward pass serves every run. A stateless weighting runs once for
    all its starts under ``torch.vmap``.
    """

    def __init__(self, methods: Sequence[Sequence[Weighting]], starts: Tensor) -> None:
        self.replays = [_Replay(weightings) for weightings in methods]
        self.x = nn.Parameter(starts.expand(len(methods), *starts.shape).clone())
        self.adam = torch.optim.Adam([self.x], lr=LR)
        self.observing = [r for r in self.replays if r.observes]
        self.after_step = [k for k, r in enumerate(self.replays) if r.after_step]

    def step(self) -> None:
        x = self.x
        losses = toy_losses(x)  # [M, S, 2]
        rows = [
            torch.autograd.grad(losses[..., task].sum(), x, retain_graph=task == 0)[0]
            for task in range(2)
        ]
        jacobians = torch.stack(rows, dim=-2)  # [M, S, tasks, 2]: run (k, s) only reaches x[k, s]
        values = losses.detach().to(torch.float64)
        x.grad = torch.stack(
            [r.directions(j, v) for r, j, v in zip(self.replays, jacobians, values)]
        )
        for k, replay in enumerate(self.replays):
            if replay.observes:
                replay.observe(values[k], after_step=False)
        self.adam.step()
        if self.after_step:
            with torch.no_grad():
                after = toy_losses(x[self.after_step]).to(torch.float64)
            for k, value in zip(self.after_step, after):
                self.replays[k].observe(value, after_step=True)

    def run(self, steps: int, progress: bool = False, position: int = 0) -> Tensor:
        """The trajectories ``[steps + 1, M, S, 2]``."""
        trajectories = torch.empty(steps + 1, *self.x.shape)
        trajectories[0] = self.x.detach()
        bar = tqdm(
            range(steps),
            disable=not progress,
            desc=f"{self.x.shape[0]} method(s)",
            position=position,
            mininterval=1.0,
        )
        for step in bar:
            self.step()
            trajectories[step + 1] = self.x.detach()
        return trajectories


# ---------------------------------------------------------------------------- figures
def _contour_grid() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    axis = np.linspace(-10.0, 10.0, 300)
    x1, x2 = np.meshgrid(axis, axis)
    with torch.no_grad():
        grid = torch.from_numpy(np.stack([x1, x2], -1))
        mean = toy_losses(grid).mean(-1).numpy()
    return x1, x2, mean


def plot(results: dict[str, np.ndarray], curve: np.ndarray, out: Path, dpi: int) -> list[Path]:
    """Trajectories over the mean loss's contours, and in loss space; returns the files."""
    plt = use_matplotlib_backend()
    x1, x2, mean = _contour_grid()
    with torch.no_grad():
        front_losses = toy_losses(torch.from_numpy(curve)).numpy()
    colors = plt.get_cmap("tab10").colors
    n = len(results)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    files = []
    for kind in ("parameter_space", "loss_space"):
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.0 * rows), squeeze=False)
        for ax in axes.flat[n:]:
            ax.axis("off")
        for ax, (label, traj) in zip(axes.flat, results.items()):
            stride = max(1, traj.shape[0] // 2000)
            path = traj[::stride]
            if kind == "parameter_space":
                ax.contour(x1, x2, mean, levels=20, colors="0.75", linewidths=0.6)
                ax.plot(*curve.T, color="0.3", linewidth=4, alpha=0.6, label="Pareto set")
                points = path
                ax.set_xlim(-10, 10)
                ax.set_ylim(-10, 10)
                ax.set_xlabel("$x_1$")
                ax.set_ylabel("$x_2$")
            else:
                ax.plot(*front_losses.T, color="0.3", linewidth=4, alpha=0.6, label="Pareto front")
                with torch.no_grad():
                    points = toy_losses(torch.from_numpy(path)).numpy()
                ax.set_xlabel(f"$L_1$ (scaled by {L1_SCALE})")
                ax.set_ylabel("$L_2$")
            for s in range(points.shape[1]):
                color = colors[s % len(colors)]
                ax.plot(points[:, s, 0], points[:, s, 1], color=color, linewidth=1.5)
                ax.plot(*points[0, s], "o", color="k", markersize=5)
                ax.plot(*points[-1, s], "*", color=color, markersize=11, markeredgecolor="k")
            ax.set_title(label)
        axes.flat[0].plot([], [], "o", color="k", markersize=5, label="start")
        axes.flat[0].plot([], [], "*", color="w", markeredgecolor="k", markersize=11, label="end")
        axes.flat[0].legend(loc="upper left", fontsize=8)
        where = {
            "parameter_space": "parameter space, over the mean loss's contours",
            "loss_space": "loss space",
        }[kind]
        fig.suptitle(f"Two-task toy (Adam lr {LR:g}, {traj.shape[0] - 1} steps): {where}")
        fig.tight_layout()
        file = out / f"toy_{kind}.png"
        fig.savefig(file, dpi=dpi)
        plt.close(fig)
        files.append(file)
    return files


# ---------------------------------------------------------------------------- main
def _check(factory: Callable[[], Weighting], starts: Tensor, steps: int, seed: int) -> np.ndarray:
    """Per start, the largest gap between the batched replay and MultiTaskOptimizer."""
    reference = run_with_optimizer(build_weightings(factory, len(starts), seed), starts, steps)
    replay = BatchedRuns([build_weightings(factory, len(starts), seed)], starts).run(steps)
    return (reference - replay[:, 0]).abs().amax(dim=(0, 2)).numpy()


def simulate(
    labels: Sequence[str],
    steps: int,
    check_steps: int,
    seed: int,
    engine: str = "batched",
    progress: bool = False,
    position: int = 0,
    threads: int = 1,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The trajectories ``[steps + 1, S, 2]`` of the methods labelled ``labels``, and per
    batched method the gaps of its check against MultiTaskOptimizer (one per start)."""
    specs = {spec.label: spec for spec in METHODS}
    starts = torch.tensor(STARTS)
    trajectories: dict[str, np.ndarray] = {}
    gaps: dict[str, np.ndarray] = {}
    with ThreadCount(threads):  # 2-entry tensors: more threads only add overhead
        factories = {label: specs[label].factory() for label in labels}
        batched = [k for k in labels if engine == "batched" and batch_supported(factories[k]())]
        for label in batched:
            gaps[label] = _check(factories[label], starts, check_steps, seed)
        if batched:
            runs = [build_weightings(factories[k], len(starts), seed) for k in batched]
            replay = BatchedRuns(runs, starts).run(steps, progress, position).numpy()
            trajectories.update({label: replay[:, k] for k, label in enumerate(batched)})
        for label in labels:
            if label not in trajectories:
                weightings = build_weightings(factories[label], len(starts), seed)
                traj = run_with_optimizer(weightings, starts, steps, progress)
                trajectories[label] = traj.numpy()
    return trajectories, gaps


def _simulate_in_workers(
    labels: Sequence[str], workers: int, **options: Any
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """:func:`simulate` with the methods dealt out to ``workers`` processes."""
    chunks = [list(labels[k::workers]) for k in range(workers)]
    trajectories: dict[str, np.ndarray] = {}
    gaps: dict[str, np.ndarray] = {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(len(chunks), mp_context=context) as pool:
        futures = [
            pool.submit(simulate, chunk, position=k, **options) for k, chunk in enumerate(chunks)
        ]
        for future in futures:
            part_trajectories, part_gaps = future.result()
            trajectories.update(part_trajectories)
            gaps.update(part_gaps)
    return trajectories, gaps


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help=f"Adam steps (default {STEPS})")
    parser.add_argument(
        "--engine",
        choices=("batched", "optimizer"),
        default="batched",
        help="replay all runs in batch (checked against the optimizer first; default) or "
        "step a MultiTaskOptimizer for every run (slow: most of an hour)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes sharing the methods (default: 2 if the machine has 2 cores, 1 with "
        "--quick)",
    )
    args = parser.parse_args(argv)
    steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
    check_steps = min(steps, 5 if args.quick else CHECK_STEPS)
    args.out.mkdir(parents=True, exist_ok=True)
    labels = [spec.label for spec, _ in available_methods(METHODS, args.methods)]
    workers = args.workers or (1 if args.quick else min(2, os.cpu_count() or 1))
    workers = max(1, min(workers, len(labels)))
    options = {
        "steps": steps,
        "check_steps": check_steps,
        "seed": args.seed,
        "engine": args.engine,
        "progress": not args.no_progress,
        "threads": args.threads,
    }
    begin = time.perf_counter()
    if workers == 1:
        trajectories, gaps = simulate(labels, **options)
    else:
        trajectories, gaps = _simulate_in_workers(labels, workers, **options)
    elapsed = time.perf_counter() - begin
    trajectories = {label: trajectories[label] for label in labels}  # in table order
    if gaps:
        worst = max(gaps, key=lambda k: gaps[k].max())
        start = STARTS[int(gaps[worst].argmax())]
        identical = sum(int((g == 0).sum()) for g in gaps.values())
        total = sum(g.size for g in gaps.values())
        print(
            f"check: batched replay vs MultiTaskOptimizer over the first {check_steps} steps: "
            f"{identical} of {total} runs identical to the bit; largest |x difference| "
            f"{gaps[worst].max():.1e} ({worst} from {start}; rounding-level differences, which "
            "Adam magnifies where a gradient component is near zero, as x1's from (0, 0))"
        )

    curve = pareto_set()
    rows, summary = [], {}
    for label, traj in trajectories.items():
        final = traj[-1].astype(np.float64)
        with torch.no_grad():
            losses = toy_losses(torch.from_numpy(final)).numpy()
        to_line = distance_to_papers_front(final)
        to_set = distance_to_set(final, curve)
        summary[label] = {"final_x": final, "losses": losses, "to_line": to_line, "to_set": to_set}
        for s, start in enumerate(STARTS):
            rows.append(
                [
                    label if s == 0 else "",
                    f"({start[0]:g}, {start[1]:g})",
                    f"({final[s, 0]:7.3f}, {final[s, 1]:7.3f})",
                    f"{to_line[s]:.3f}",
                    f"{to_set[s]:.3f}",
                    f"{losses[s, 0]:.3f}",
                    f"{losses[s, 1]:.3f}",
                ]
            )
    print(
        f"\nWhere each run ends after {steps} Adam steps (lr {LR:g}); L1 includes the factor "
        f"{L1_SCALE}.\n'to line': distance to the papers' front x2 = {PAPERS_FRONT_X2}, x1 in "
        "[-7, 7]; 'to set': distance to the exact Pareto set (x2 from -8.3551 to -8.4345)."
    )
    headers = ["method", "start", "final x", "to line", "to set", "L1", "L2"]
    print(format_table(headers, rows, "<<<"))
    print(f"time: {elapsed:.0f}s for {len(trajectories)} methods x {len(STARTS)} starts")
    files = plot(trajectories, curve, args.out, dpi=60 if args.quick else 110)
    for file in files:
        print(f"wrote {file}")
    return {"summary": summary, "check_gaps": gaps, "files": files, "steps": steps}


if __name__ == "__main__":
    main()
