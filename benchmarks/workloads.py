"""Reference workloads: a shared encoder, one head per task, one regression loss per task.

Every model exposes ``encoder`` (the shared parameters), ``heads`` (one module per task),
``features(x)`` (the shared representation ``z``, what torchjd's ``mtl_backward`` and
mtlopt's representation mode differentiate through) and ``task_losses(z, y)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel


class MultiTaskModel(nn.Module):
    """A shared encoder and ``n_tasks`` heads, each a regression to one column of ``y``."""

    encoder: nn.Module
    heads: nn.ModuleList

    def features(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def task_losses(self, z: Tensor, y: Tensor) -> list[Tensor]:
        return [
            nn.functional.mse_loss(head(z).squeeze(-1), y[:, t])
            for t, head in enumerate(self.heads)
        ]

    def losses(self, x: Tensor, y: Tensor) -> list[Tensor]:
        return self.task_losses(self.features(x), y)

    def shared_parameters(self) -> list[Tensor]:
        return list(self.encoder.parameters())

    def task_parameters(self) -> list[list[Tensor]]:
        return [list(head.parameters()) for head in self.heads]


class MLP(MultiTaskModel):
    """Issue 4's MLP: Linear 256-512-512 encoder with ReLU, heads Linear(512, 1)."""

    def __init__(self, n_tasks: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(512, 1) for _ in range(n_tasks))


class CNN(MultiTaskModel):
    """Three 3x3 conv layers (8, 16, 32 channels) on 3 x 32 x 32 inputs, pooled to 128
    features; heads Linear(128, 1)."""

    def __init__(self, n_tasks: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),    # 16 x 16
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 8 x 8
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4 x 4
            nn.Flatten(), nn.Linear(32 * 4 * 4, 128), nn.ReLU(),
        )  # fmt: skip
        self.heads = nn.ModuleList(nn.Linear(128, 1) for _ in range(n_tasks))


class Transformer(MultiTaskModel):
    """A 2-layer Transformer encoder (d_model 64, 4 attention heads, feed-forward 128, no
    dropout, attention on SDPA's math backend) over 32 tokens of 16 features, mean-pooled;
    heads Linear(64, 1)."""

    def __init__(self, n_tasks: int) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            d_model=64, nhead=4, dim_feedforward=128, dropout=0.0, batch_first=True
        )
        self.embed = nn.Linear(16, 64)
        # enable_nested_tensor only matters for padded inference; off keeps one code path.
        self.body = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.encoder = nn.ModuleList([self.embed, self.body])
        self.heads = nn.ModuleList(nn.Linear(64, 1) for _ in range(n_tasks))

    def features(self, x: Tensor) -> Tensor:
        # The math backend of scaled_dot_product_attention: its backward is made of ops that
        # vmap batches. The CPU flash-attention backward has no batching rule, so torch would
        # run it once per task (and warn) inside every batched contender alike.
        with sdpa_kernel(SDPBackend.MATH):
            return self.body(self.embed(x)).mean(1)


@dataclass(frozen=True)
class Workload:
    """A model family and its batch; ``build(m)`` gives a fresh model for ``m`` tasks."""

    name: str
    description: str
    build: Callable[[int], MultiTaskModel]
    input_shape: tuple[int, ...]

    def batch(self, n_tasks: int, device: torch.device) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(1234)
        x = torch.randn(*self.input_shape, generator=generator)
        y = torch.randn(self.input_shape[0], n_tasks, generator=generator)
        return x.to(device), y.to(device)


WORKLOADS: dict[str, Workload] = {
    "mlp": Workload("mlp", "MLP 256-512-512, batch 256", MLP, (256, 256)),
    "cnn": Workload(
        "cnn", "CNN 3 conv (8-16-32) + fc 128, 3x32x32, batch 32", CNN, (32, 3, 32, 32)
    ),
    "transformer": Workload(
        "transformer",
        "Transformer 2 layers, d_model 64, seq 32, batch 16",
        Transformer,
        (16, 32, 16),
    ),
}


def parameter_count(params: list[Tensor]) -> int:
    return sum(p.numel() for p in params)
