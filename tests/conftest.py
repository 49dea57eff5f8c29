"""Shared fixtures: a small shared-encoder model with task heads, and state snapshots."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from hypothesis import settings
from torch import nn

from mtlopt import MultiTaskOptimizer
from mtlopt.weighting import IMTL, IMTLG, IMTLL, ExcessMTL, GradVac, Mean, Sum

N_TASKS = 3

# The default run draws the same examples every time, so CI is reproducible; run with
# HYPOTHESIS_PROFILE=explore to draw fresh ones (and keep any failure as an @example).
settings.register_profile("deterministic", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

#: One factory per weighting, each with non-default hyperparameters where it has them.
WEIGHTINGS = {
    "Mean": Mean,
    "Sum": Sum,
    "GradVac": lambda: GradVac(beta=0.3),
    "ExcessMTL": lambda: ExcessMTL(robust_step_size=0.5),
    "ExcessMTL-warmup": lambda: ExcessMTL(robust_step_size=0.5, n_warmup_steps=3),
    "IMTLG": IMTLG,
    "IMTLL": lambda: IMTLL(lr=0.05),
    "IMTL": IMTL,
}


class Net(nn.Module):
    def __init__(self, n_tasks: int = N_TASKS) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(n_tasks))
        self.unused = nn.Linear(2, 2)  # reached by no loss

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        z = self.encoder(x)
        return [((h(z).squeeze(-1) - y[:, t]) ** 2).mean() for t, h in enumerate(self.heads)]


def make_batch(seed: int, n_tasks: int = N_TASKS) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 6, generator=g)
    y = torch.randn(16, n_tasks, generator=g) * torch.tensor([1.0, 5.0, 0.2, 1.0, 2.0][:n_tasks])
    return x, y


def make_optimizer(net: Net, weighting, lr: float = 0.05, base: str = "adam"):  # noqa: ANN001
    groups = [
        {"params": net.encoder.parameters()},
        {"params": net.heads.parameters()},
        {"params": net.unused.parameters()},
    ]
    if base == "adam":
        inner = torch.optim.Adam(groups, lr=lr)
    else:
        inner = torch.optim.SGD(groups, lr=lr, momentum=0.9)
    return MultiTaskOptimizer(inner, weighting=weighting)


def snapshot(net: nn.Module, opt: MultiTaskOptimizer) -> dict:
    """Everything a failed call must leave untouched."""
    return {
        "params": [p.detach().clone() for p in net.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in net.parameters()],
        "opt": copy.deepcopy(opt.state_dict()),
    }


def assert_same(a: object, b: object) -> None:
    """Deep equality of nested dicts/lists of tensors and scalars (exact)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (set(a), set(b))
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b, (a, b)


@pytest.fixture(params=sorted(WEIGHTINGS))
def weighting_name(request: pytest.FixtureRequest) -> str:
    return request.param
