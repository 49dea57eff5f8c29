"""Long-run stability (slow): 10,000 steps per stateful method on the two-task toy problem,
with no growth of memory and no drift to non-finite state."""

from __future__ import annotations

import pytest
import torch

from mtlopt import MultiTaskOptimizer
from mtlopt.weighting.base import REGISTRY

from .method_kit import FACTORIES, FIXED_TASKS
from .toy_problem import toy_losses

STEPS = 10_000
STATEFUL = sorted(
    name
    for name, cls in REGISTRY.items()
    if cls.stateful and name in FACTORIES and FIXED_TASKS.get(name, 2) == 2
)


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def state_tensors(opt: MultiTaskOptimizer) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []

    def walk(value: object) -> None:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(opt.state_dict())
    return found


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*finished \\(Adam-like\\) step")
@pytest.mark.parametrize("name", STATEFUL)
def test_ten_thousand_steps(name: str) -> None:
    torch.manual_seed(0)
    x = torch.nn.Parameter(torch.tensor([-8.5, 7.5]))
    base = torch.optim.SGD([x], lr=1e-3) if name == "AdaTask" else torch.optim.Adam([x], lr=1e-3)
    opt = MultiTaskOptimizer(base, weighting=FACTORIES[name](), nonfinite="skip")
    checkpoints = {}
    for step in range(1, STEPS + 1):
        opt.zero_grad()
        # Shifted to be positive: GLS, STCH and FAMO take logarithms of the losses.
        opt.step(lambda: [loss + 25.0 for loss in toy_losses(x)])
        if step in (STEPS // 10, STEPS):
            checkpoints[step] = resident_bytes()
    assert torch.isfinite(x).all()
    for tensor in state_tensors(opt):
        if tensor.is_floating_point():
            assert torch.isfinite(tensor).all(), name
    growth = checkpoints[STEPS] - checkpoints[STEPS // 10]
    assert growth < 16 * 2**20, f"{name}: resident memory grew by {growth / 2**20:.1f} MiB"
