"""Quick start: one shared encoder, three task heads, trained with GradVac, ExcessMTL and IMTL.

The data is generated (no download): three regression targets computed from the same inputs,
one of them with a much larger scale and one partly opposed to another, so the tasks compete
for the encoder. Each method trains the same initial model; the script prints every task's
test loss before and after training.

Run:  python examples/quickstart.py
"""

from __future__ import annotations

import time

import torch
from torch import nn

from mtlopt import MultiTaskOptimizer
from mtlopt.weighting import IMTL, ExcessMTL, GradVac, Mean

N_TASKS = 3
STEPS = 1000


def make_data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 16, generator=generator)
    base = torch.sin(x[:, :4].sum(1))
    targets = torch.stack(
        [
            base + 0.1 * x[:, 5],  # task 0
            10.0 * (x[:, 4] * x[:, 6]),  # task 1: ten times the scale
            -base + 0.5 * torch.tanh(x[:, 7]),  # task 2: partly opposed to task 0
        ],
        dim=1,
    )
    return x, targets


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(64, 1) for _ in range(N_TASKS))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.encoder(x)
        return [head(z).squeeze(-1) for head in self.heads]


def task_losses(model: Model, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    return [nn.functional.mse_loss(out, y[:, t]) for t, out in enumerate(model(x))]


def train(weighting, initial: dict, data) -> tuple[list[float], list[float], float]:  # noqa: ANN001
    x_train, y_train, x_test, y_test = data
    model = Model()
    model.load_state_dict(initial)
    base = torch.optim.Adam(
        [{"params": model.encoder.parameters()}, {"params": model.heads.parameters()}], lr=3e-3
    )
    opt = MultiTaskOptimizer(base, weighting=weighting)
    with torch.no_grad():
        before = [loss.item() for loss in task_losses(model, x_test, y_test)]
    start = time.perf_counter()
    for step in range(STEPS):
        batch = slice((step * 128) % 2048, (step * 128) % 2048 + 128)
        opt.zero_grad()
        opt.step(task_losses(model, x_train[batch], y_train[batch]))
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        after = [loss.item() for loss in task_losses(model, x_test, y_test)]
    return before, after, elapsed


def main() -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    x_train, y_train = make_data(2048, generator)
    x_test, y_test = make_data(1024, generator)
    data = (x_train, y_train, x_test, y_test)
    initial = Model().state_dict()

    methods = {
        "Mean": Mean(),
        "GradVac(beta=0.01)": GradVac(beta=0.01),
        "ExcessMTL(robust_step_size=1.0)": ExcessMTL(robust_step_size=1.0),
        "IMTL()": IMTL(),
    }
    print(f"{N_TASKS} tasks, {STEPS} Adam steps of batch 128; test MSE per task (before -> after)")
    print(f"{'method':<34}" + "".join(f"{'task ' + str(t):>20}" for t in range(N_TASKS)) + "   time")
    for name, weighting in methods.items():
        before, after, elapsed = train(weighting, initial, data)
        cells = "".join(f"{b:>9.3f} -> {a:<7.3f}" for b, a in zip(before, after))
        print(f"{name:<34}{cells} {elapsed:5.1f}s")
        assert all(a < b for a, b in zip(after, before)), f"{name}: a task loss did not go down"


if __name__ == "__main__":
    main()
