"""examples/lightning_example.py: MultiTaskOptimizer under Lightning's manual optimisation."""

from __future__ import annotations

import copy
import csv
import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from mtlopt import MultiTaskOptimizer

from .conftest import assert_same

L = pytest.importorskip("lightning")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TINY = ["--n-train", "512", "--no-progress"]  # 8 steps of 64 per epoch


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    # Imported by plain name, as the other examples are (the file is not called lightning.py:
    # run as a script, it would shadow the lightning package it imports).
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return importlib.import_module("lightning_example")


def test_trains_every_task_through_the_wrapper(example: ModuleType, tmp_path: Path) -> None:
    out = example.main(["--epochs", "3", "--log-dir", str(tmp_path), *TINY])
    assert all(a < b for a, b in zip(out["after"], out["before"])), out
    # The step went through LightningOptimizer: Lightning counted every optimizer step.
    assert out["global_step"] == 3 * 8
    opt = out["result"].trainer.optimizers[0]
    assert isinstance(opt, MultiTaskOptimizer)
    assert type(opt.weightings()[0]).__name__ == "IMTL"
    weights = opt.last_step[0].weights
    assert weights is not None and weights.shape == (3,) and torch.isfinite(weights).all()
    # IMTL balances the scales: the product task (a hundred times the loss) weighs least.
    assert weights[1] < weights[0] and weights[1] < weights[2]
    assert [len(row["weights"]) for row in out["history"]] == [3, 3, 3]
    # The task weights and losses reached the logger.
    (metrics,) = tmp_path.glob("mtlopt/version_*/metrics.csv")
    with metrics.open() as file:
        rows = list(csv.DictReader(file))
    logged = {key for row in rows for key, value in row.items() if value}
    for name in ("wave", "product", "sign"):
        assert {f"train/weight_{name}_step", f"train/loss_{name}", f"val/loss_{name}"} <= logged


class _Snapshot(L.Callback):
    """The optimizer's state_dict when training (re)starts, after Lightning restored it."""

    def __init__(self) -> None:
        self.state: dict[str, Any] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A copy: state_dict() shares the optimizer's live tensors (Adam's step counts).
        self.state = copy.deepcopy(trainer.optimizers[0].state_dict())


def test_checkpoint_resume_restores_the_weighting_state(
    example: ModuleType, tmp_path: Path
) -> None:
    def config(epochs: int) -> Any:
        return example.Config(epochs=epochs, n_train=512, n_val=128, progress=False)

    straight = example.train(config(2))
    ckpt = tmp_path / "one.ckpt"
    example.train(config(1), save=ckpt)
    snapshot = _Snapshot()
    resumed = example.train(config(2), resume=ckpt, callbacks=[snapshot])

    saved = torch.load(ckpt, weights_only=True)["optimizer_states"][0]
    assert saved["mtlopt"]["groups"][0]["weighting"] == "IMTL"
    assert saved["mtlopt"]["groups"][0]["state"]["n_tasks"] == 3  # it has stepped
    assert snapshot.state is not None
    assert_same(snapshot.state["mtlopt"], saved["mtlopt"])
    assert_same(snapshot.state["state"], saved["state"])
    # Resuming from the checkpoint is bit-identical to never stopping.
    assert resumed.trainer.global_step == straight.trainer.global_step == 16
    assert_same(resumed.module.state_dict(), straight.module.state_dict())
    assert_same(
        resumed.trainer.optimizers[0].state_dict(), straight.trainer.optimizers[0].state_dict()
    )


def test_two_phase_form(example: ModuleType) -> None:
    class TwoPhase(example.MultiTaskModule):
        def training_step(self, batch: Any, batch_idx: int) -> None:
            opt = self.optimizers()
            opt.zero_grad()
            opt.optimizer.backward(self.task_losses(*batch))
            opt.step()  # Lightning calls MultiTaskOptimizer.step(closure=<returns None>)

    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = example.make_data(128, torch.Generator().manual_seed(0))
    trainer.fit(TwoPhase(), torch.utils.data.DataLoader(data, batch_size=64))
    assert trainer.global_step == 2


def test_bf16_mixed_precision(example: ModuleType) -> None:
    config = example.Config(epochs=1, n_train=128, n_val=64, progress=False)
    config.precision = "bf16-mixed"
    result = example.train(config)
    assert result.trainer.global_step == 2
