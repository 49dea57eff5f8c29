"""Data-parallel multi-task training with torch.distributed: every rank takes its share of the
batch, mtlopt averages the per-task gradients across ranks before the weighting, and every
rank writes the same update.

Launch with torchrun (two CPU processes, the gloo backend; no download, generated data):

    torchrun --nproc_per_node 2 examples/distributed.py
    torchrun --nproc_per_node 2 examples/distributed.py --weighting gradvac --steps 200

What it shows:

* ``MultiTaskOptimizer`` finds the initialised process group by itself (``distributed=None``)
  and averages the loss values and the per-task gradients of every parameter across ranks
  (one ``all_reduce`` per dtype) before any weighting runs, so the weighting sees the global
  Jacobian and every rank takes the same decision and keeps the same state.
* The model is *not* wrapped in ``DistributedDataParallel``: its reducer would average the
  gradients a second time. Build the model and the optimizer with the same seed everywhere.
* At the end, rank 0 prints the per-task test losses, and the script checks that the
  parameters and the weighting's state are identical on every rank (it exits with an error
  otherwise).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mtlopt import MultiTaskOptimizer

N_TASKS = 3


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three regression targets from the same inputs: one ten times larger, one opposed."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=generator)
    base = torch.sin(x[:, :4].sum(1))
    targets = [base + 0.1 * x[:, 5], 10.0 * x[:, 4] * x[:, 6], -base + 0.5 * torch.tanh(x[:, 7])]
    return x, torch.stack(targets, dim=1)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(64, 1) for _ in range(N_TASKS))

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        z = self.encoder(x)
        return [
            nn.functional.mse_loss(head(z).squeeze(-1), y[:, t])
            for t, head in enumerate(self.heads)
        ]


def flat_state(model: nn.Module, opt: MultiTaskOptimizer) -> torch.Tensor:
    """Every parameter and every floating-point tensor of the optimizer's state (the base
    optimizer's moments and each weighting's state), in one vector."""
    tensors = [p.detach().reshape(-1) for p in model.parameters()]

    def collect(value: object) -> None:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            tensors.append(value.detach().reshape(-1).to(torch.float32))
        elif isinstance(value, dict):
            for item in value.values():
                collect(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                collect(item)

    collect(opt.state_dict())
    return torch.cat(tensors)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weighting", default="imtl", help="weighting name (default imtl)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--batch", type=int, default=128, help="global batch size (default 128)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        torch.set_num_threads(1)  # one core per process
        torch.manual_seed(args.seed)  # the same model and weighting state on every rank
        model = Model()
        opt = MultiTaskOptimizer(
            torch.optim.Adam(model.parameters(), lr=3e-3), weighting=args.weighting
        )
        x_train, y_train = make_data(8192, args.seed)
        x_test, y_test = make_data(2048, args.seed + 1)
        share = args.batch // world
        with torch.no_grad():
            before = [loss.item() for loss in model.losses(x_test, y_test)]
        for step in range(args.steps):
            start = (step * args.batch) % (len(x_train) - args.batch)
            mine = slice(start + rank * share, start + (rank + 1) * share)  # this rank's share
            opt.zero_grad()
            opt.step(model.losses(x_train[mine], y_train[mine]))
        with torch.no_grad():
            after = [loss.item() for loss in model.losses(x_test, y_test)]
        state = flat_state(model, opt)
        gathered = [torch.empty_like(state) for _ in range(world)]
        dist.all_gather(gathered, state)
        identical = all(torch.equal(gathered[0], other) for other in gathered[1:])
        if rank == 0:
            print(f"{world} ranks, {args.weighting}, {args.steps} steps of {args.batch} samples")
            for t in range(N_TASKS):
                print(f"task {t}: test loss {before[t]:8.4f} -> {after[t]:8.4f}")
            print("parameters and weighting state identical on every rank:", identical)
            print("last task weights:", [round(w, 4) for w in opt.last_step[0].weights.tolist()])
        if not identical:
            raise SystemExit(f"rank {rank}: the ranks diverged")
        return {"before": before, "after": after, "identical": identical, "world": world}
    finally:
        # Both ranks reach this point before either tears its side down (a rank that leaves
        # while the other still talks to the store makes the other abort).
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
