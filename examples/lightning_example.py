"""Multi-task training under PyTorch Lightning: MultiTaskOptimizer with manual optimisation.

A shared MLP encoder with three task heads learns three targets generated from the same
inputs (no download): ``wave``, a sine of two inputs (MSE, scale about 1); ``product``, ten
times the product of two other inputs (MSE, about a hundred times the first loss); ``sign``,
the sign of a sum that partly shares ``wave``'s inputs (binary cross-entropy). The tasks
compete for the encoder at very different loss scales, which is what the weightings are for.

The LightningModule sets ``automatic_optimization = False`` and returns the
``MultiTaskOptimizer`` from ``configure_optimizers``; ``training_step`` hands it the task
losses through Lightning's ``LightningOptimizer`` wrapper as a closure::

    opt = self.optimizers()                                # LightningOptimizer
    opt.zero_grad()
    losses = opt.step(closure=lambda: self.task_losses(x, y))   # returns the task losses
    weights = opt.optimizer.last_step[0].weights           # log them

Why a closure. ``LightningOptimizer.step`` never calls the optimizer directly: it goes
through the strategy and the precision plugin, which count the optimizer step (so
``trainer.global_step``, ``max_steps`` and the checkpoint's progress advance), run the
``on_before_optimizer_step`` hooks and call ``optimizer.step(closure=...)``, always with a
closure. A closure that returns the losses (without calling backward) is one of the forms
``MultiTaskOptimizer.step`` accepts, so the losses pass through unchanged and
``opt.step`` returns them. It also lets weightings that learn from the loss decrease (FAMO)
re-evaluate the batch after the step, as their paper does.

The other forms, and why not here:

* ``opt.step(losses)``: Lightning takes the first argument as the closure and refuses a list.
  ``opt.step(losses=losses)`` reaches ``MultiTaskOptimizer.step`` together with Lightning's
  closure, which it refuses (losses and a closure together).
* Two phases, ``opt.optimizer.backward(losses)`` then ``opt.step()``: works too (Lightning
  passes its do-nothing closure, whose ``None`` tells MultiTaskOptimizer to step on the
  ``.grad`` already there); use it to clip or inspect the gradients in between, or to pass
  ``scaler=`` (see Precision). The test covers it.
* ``self.optimizers(use_pl_optimizer=False).step(losses)`` trains, but bypasses the
  wrapper: ``trainer.global_step`` stays 0 and the step hooks do not run.

Caveats of the closure form: ``on_before_optimizer_step`` runs after the closure but before
mtlopt writes ``.grad`` (hooks there see no gradients; ``opt.optimizer.last_step`` and the
``.grad`` after ``opt.step`` hold what was applied), and it runs once more when FAMO
re-evaluates the batch. Call mtlopt's own methods and attributes on ``opt.optimizer``, the
real MultiTaskOptimizer: the wrapper's class derives from the optimizer's, so a method
called through it (``opt.backward``) stores its state (``last_step``) on the wrapper.

Precision: the step runs inside ``training_step``, hence inside the autocast region of
``--precision bf16-mixed``; MultiTaskOptimizer turns autocast off for its own arithmetic, so
every weighting works there (the test runs it). ``16-mixed`` on a GPU (a GradScaler) does
not suit the closure form: Lightning's AMP plugin calls the closure itself, then
``scaler.step(opt)`` without it, so the losses never reach mtlopt; use the two-phase form
with ``opt.optimizer.backward(losses, scaler=...)`` there.

Checkpoints: Lightning saves ``optimizer.state_dict()``, which carries every weighting's
state, and loads it on ``trainer.fit(..., ckpt_path=...)``; ``--save`` and ``--resume``
show it, and the test checks that an interrupted run resumes bit-identically.

Run:  python examples/lightning_example.py                  (a few seconds on CPU)
      python examples/lightning_example.py --weighting famo --epochs 20 --log-dir logs
      python examples/lightning_example.py --epochs 3 --save run.ckpt
      python examples/lightning_example.py --epochs 6 --resume run.ckpt
"""

from __future__ import annotations

import argparse
import functools
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from mtlopt import MultiTaskOptimizer

TASKS = ("wave", "product", "sign")


@dataclass
class Config:
    epochs: int = 10
    weighting: str = "imtl"
    seed: int = 0
    lr: float = 3e-3
    batch_size: int = 64
    n_train: int = 2048
    n_val: int = 512
    threads: int | None = 1
    progress: bool = True
    precision: str = "32-true"
    log_dir: Path | None = None  # a CSVLogger writes there; None: no logger


# ---------------------------------------------------------------------------- data
def make_data(n: int, generator: torch.Generator) -> TensorDataset:
    """Inputs [n, 8] and three targets [n, 3] (two regressions, one 0/1 label)."""
    x = torch.randn(n, 8, generator=generator)
    noise = 0.1 * torch.randn(n, generator=generator)
    y = torch.stack(
        [
            torch.sin(x[:, 0] + x[:, 1]) + noise,  # wave
            10.0 * x[:, 2] * x[:, 3],  # product: a hundred times the loss scale
            (x[:, 0] - x[:, 1] + x[:, 4] > 0).float(),  # sign: shares wave's inputs
        ],
        dim=1,
    )
    return TensorDataset(x, y)


class EpochSampler(Sampler[int]):
    """A new permutation every epoch, a function of (seed, epoch) only.

    Lightning calls ``set_epoch`` at the start of every epoch, also after a resume, so a
    resumed run sees the batches the uninterrupted one would have seen.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n


# ---------------------------------------------------------------------------- model
class MultiTaskModule(L.LightningModule):
    """Shared encoder, one linear head per task, trained by a MultiTaskOptimizer."""

    def __init__(self, weighting: str = "imtl", lr: float = 3e-3, width: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()
        # Lightning must not call backward itself: the optimizer differentiates the losses.
        self.automatic_optimization = False
        self.encoder = nn.Sequential(
            nn.Linear(8, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU()
        )
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in TASKS)
        #: Per finished epoch: the mean validation loss and mean task weights, per task.
        self.history: list[dict[str, list[float]]] = []
        self._weight_sum = torch.zeros(len(TASKS), dtype=torch.float64)
        self._weight_count = 0
        self._val_sum = torch.zeros(len(TASKS), dtype=torch.float64)
        self._val_count = 0

    def forward(self, x: Tensor) -> list[Tensor]:
        z = self.encoder(x)
        return [head(z).squeeze(-1) for head in self.heads]

    def task_losses(self, x: Tensor, y: Tensor) -> list[Tensor]:
        wave, product, sign = self(x)
        return [
            nn.functional.mse_loss(wave, y[:, 0]),
            nn.functional.mse_loss(product, y[:, 1]),
            nn.functional.binary_cross_entropy_with_logits(sign, y[:, 2]),
        ]

    def configure_optimizers(self) -> MultiTaskOptimizer:
        base = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return MultiTaskOptimizer(base, weighting=self.hparams.weighting)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        opt = self.optimizers()
        opt.zero_grad()
        # Through the wrapper, as a closure: see the module docstring for why.
        losses = opt.step(closure=functools.partial(self.task_losses, x, y))
        for name, loss in zip(TASKS, losses):
            self.log(f"train/loss_{name}", loss.detach(), on_step=False, on_epoch=True)
        weights = opt.optimizer.last_step[0].weights  # float64, one per task (None: no weights)
        if weights is not None:
            for name, weight in zip(TASKS, weights.float()):
                self.log(f"train/weight_{name}", weight, on_step=True, on_epoch=True)
            self._weight_sum += weights.detach().cpu()
            self._weight_count += 1

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        losses = torch.stack(self.task_losses(*batch)).detach()
        for name, loss in zip(TASKS, losses):
            self.log(f"val/loss_{name}", loss, on_epoch=True)
        self._val_sum += losses.double().cpu() * len(batch[0])
        self._val_count += len(batch[0])

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking and self._val_count:
            weights = self._weight_sum / max(self._weight_count, 1)
            self.history.append(
                {
                    "val_loss": (self._val_sum / self._val_count).tolist(),
                    "weights": weights.tolist() if self._weight_count else [],
                }
            )
        self._weight_sum.zero_()
        self._val_sum.zero_()
        self._weight_count = self._val_count = 0


@torch.no_grad()
def evaluate(module: MultiTaskModule, data: TensorDataset) -> list[float]:
    """Per-task loss on the whole of ``data``."""
    module.eval()
    losses = [loss.item() for loss in module.task_losses(*data.tensors)]
    module.train()
    return losses


# ---------------------------------------------------------------------------- training
@dataclass
class Result:
    module: MultiTaskModule
    trainer: L.Trainer
    before: list[float]  # per-task validation loss of the initial model
    after: list[float]  # and of the trained one
    history: list[dict[str, list[float]]] = field(default_factory=list)


def train(
    config: Config,
    *,
    resume: Path | None = None,
    save: Path | None = None,
    callbacks: Sequence[L.Callback] = (),
) -> Result:
    """Fit a fresh module for ``config.epochs`` epochs (in all, counting those already done
    when resuming from the Lightning checkpoint ``resume``); ``save`` writes one at the end."""
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)  # small tensors: more threads only add overhead
    try:
        L.seed_everything(config.seed, verbose=False)
        data = torch.Generator().manual_seed(config.seed)
        train_set, val_set = make_data(config.n_train, data), make_data(config.n_val, data)
        train_loader = DataLoader(
            train_set,
            batch_size=config.batch_size,
            sampler=EpochSampler(config.n_train, config.seed),
        )
        val_loader = DataLoader(val_set, batch_size=config.n_val)
        module = MultiTaskModule(config.weighting, config.lr)
        before = evaluate(module, val_set)
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            precision=config.precision,
            max_epochs=config.epochs,
            logger=CSVLogger(config.log_dir, name="mtlopt") if config.log_dir else False,
            enable_checkpointing=False,
            enable_progress_bar=config.progress,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            log_every_n_steps=10,
            callbacks=list(callbacks),
        )
        with warnings.catch_warnings():
            # In-memory tensors: worker processes would only add start-up time.
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            # weights_only: mtlopt's state_dict holds only tensors and Python scalars.
            trainer.fit(module, train_loader, val_loader, ckpt_path=resume, weights_only=True)
        if save is not None:
            trainer.save_checkpoint(save, weights_only=False)  # with the optimizer's state
        return Result(module, trainer, before, evaluate(module, val_set), module.history)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> tuple[Config, argparse.Namespace]:
    defaults = Config()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="default 10")
    parser.add_argument(
        "--weighting", default=defaults.weighting, help="a weighting's name (default imtl)"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="default 0")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="Adam's lr (3e-3)")
    parser.add_argument("--n-train", type=int, default=defaults.n_train, help="default 2048")
    parser.add_argument(
        "--precision", default="32-true", help="Lightning's precision (default 32-true)"
    )
    parser.add_argument("--log-dir", type=Path, default=None, help="CSVLogger folder")
    parser.add_argument("--save", type=Path, default=None, help="write a checkpoint at the end")
    parser.add_argument("--resume", type=Path, default=None, help="resume from a checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    config = Config(
        epochs=args.epochs,
        weighting=args.weighting,
        seed=args.seed,
        lr=args.lr,
        n_train=args.n_train,
        threads=args.threads,
        progress=not args.no_progress,
        precision=args.precision,
        log_dir=args.log_dir,
    )
    return config, args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    config, args = parse_args(argv)
    result = train(config, resume=args.resume, save=args.save)
    opt = result.trainer.optimizers[0]
    print(
        f"\n{opt.weightings()[0]!r}, Adam lr {config.lr:g}, {config.n_train} samples, "
        f"{result.trainer.global_step} steps in {result.trainer.current_epoch} epoch(s)"
    )
    print(f"{'epoch':>6}" + "".join(f"{'val ' + n:>13}" for n in TASKS) + "   task weights")
    print(f"{'init':>6}" + "".join(f"{v:>13.4f}" for v in result.before))
    first = result.trainer.current_epoch - len(result.history)
    for epoch, row in enumerate(result.history, start=first + 1):
        weights = " ".join(f"{w:.3f}" for w in row["weights"])
        print(f"{epoch:>6}" + "".join(f"{v:>13.4f}" for v in row["val_loss"]) + f"   {weights}")
    down = [a < b for a, b in zip(result.after, result.before)]
    print(
        "every task's validation loss went down"
        if all(down)
        else f"not every task's loss went down: {dict(zip(TASKS, down))}"
    )
    if args.save:
        print(f"wrote {args.save}")
    return {
        "before": result.before,
        "after": result.after,
        "history": result.history,
        "global_step": result.trainer.global_step,
        "result": result,
    }


if __name__ == "__main__":
    main()
