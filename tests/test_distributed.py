"""Two gloo ranks on CPU, the batch split between them, match one process on the whole batch."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mtlopt import MultiTaskOptimizer
from mtlopt.weighting import weighting_class

from .conftest import Net, make_batch

METHODS = ["GradVac", "ExcessMTL", "IMTL", "UPGrad", "Mean"]
STEPS = 4


def available_methods() -> list[str]:
    names = []
    for name in METHODS:
        try:
            weighting_class(name)
        except ValueError:
            continue
        names.append(name)
    return names


def train(name: str, rank: int, world: int) -> list[torch.Tensor]:
    torch.manual_seed(0)
    net = Net()
    base = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    opt = MultiTaskOptimizer(base, weighting=weighting_class(name)())
    for step in range(STEPS):
        x, y = make_batch(step)
        share = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        opt.zero_grad()
        opt.step(net.losses(x[share], y[share]))
    return [p.detach().clone() for p in net.parameters()]


def worker(rank: int, world: int, init_file: str, out_dir: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {name: train(name, rank, world) for name in names}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results() -> dict:
    names = available_methods()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(worker, args=(2, init_file, tmp, names), nprocs=2, join=True)
        return {rank: torch.load(os.path.join(tmp, f"rank{rank}.pt")) for rank in range(2)}


@pytest.mark.parametrize("name", available_methods())
def test_two_ranks_match_one_process(name: str, distributed_results: dict) -> None:
    single = train(name, rank=0, world=1)
    for rank in range(2):
        for ours, expected in zip(distributed_results[rank][name], single):
            torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-7)


def test_ranks_agree_exactly(distributed_results: dict) -> None:
    for name, params in distributed_results[0].items():
        for a, b in zip(params, distributed_results[1][name]):
            assert torch.equal(a, b), name


def test_bad_distributed_option() -> None:
    with pytest.raises(TypeError, match="distributed: expected"):
        MultiTaskOptimizer(torch.optim.SGD(Net().parameters(), lr=0.1), distributed="yes")
    with pytest.raises(ValueError, match="init_process_group"):
        MultiTaskOptimizer(torch.optim.SGD(Net().parameters(), lr=0.1), distributed=True)
