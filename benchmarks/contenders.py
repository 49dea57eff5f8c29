"""One training step per contender, each on its own copy of the same model and batch.

Kinds (every step starts with ``zero_grad()`` and ends with the base SGD step):

* ``plain``: ``sum(losses).backward()``: what a loss-only method may cost;
* ``floor``: one bare batched VJP of all m losses over every parameter
  (``autograd.grad(stack(losses), params, eye(m), is_grads_batched=True)``), the mean written
  to ``.grad``: the least an exact (per-task gradient) method can cost;
* ``floor-z``: the same mean, computed as torchjd's ``mtl_backward`` structures it: each
  task's gradient of the shared representation ``z`` through its own head (m small backward
  passes), then one batched VJP of ``z`` through the encoder. Not the issue's floor, but on
  many-head models it is below it (see "Cost against m" in the results);
* ``loop``: m sequential ``autograd.grad`` calls (LibMTL's way), then the same mtlopt
  weighting applied to the stacked per-task gradients (Gramian summed per tensor, or
  ``update_from_jacobian``); task heads get their own task's gradient. Exact methods only;
* ``torchjd``: torchjd 0.18's ``mtl_backward(losses, features=z)`` + ``jac_to_grad(shared,
  aggregator)`` as its README shows, or ``scalarizer(stack(losses)).backward()`` for
  loss-only methods;
* ``mtlopt``: ``MultiTaskOptimizer.step(losses)``;
* ``mtlopt-rep``: ``MultiTaskOptimizer.step(losses, features=z)`` (representation mode),
  Gramian methods only, when the installed mtlopt has it.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mtlopt import MultiTaskOptimizer

from .methods import Method
from .workloads import MultiTaskModel

LR = 1e-3
KINDS = ("plain", "floor", "floor-z", "loop", "torchjd", "mtlopt", "mtlopt-rep")


@dataclass
class Contender:
    kind: str
    method: str  #: "" for plain and floor, which do not depend on the method
    step: Callable[[], None]
    model: MultiTaskModel  #: the contender's own copy of the model

    @property
    def key(self) -> tuple[str, str]:
        return (self.method, self.kind)

    @property
    def label(self) -> str:
        return self.kind if not self.method else f"{self.kind} {self.method}"


def has_representation_mode() -> bool:
    return "features" in inspect.signature(MultiTaskOptimizer.step).parameters


def _sgd(params: list[Tensor]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR)


def plain(template: MultiTaskModel, x: Tensor, y: Tensor) -> Contender:
    model = copy.deepcopy(template)
    opt = _sgd(list(model.parameters()))

    def step() -> None:
        opt.zero_grad()
        sum(model.losses(x, y)).backward()
        opt.step()

    return Contender("plain", "", step, model)


def floor(template: MultiTaskModel, x: Tensor, y: Tensor) -> Contender:
    model = copy.deepcopy(template)
    params = list(model.parameters())
    opt = _sgd(params)
    n_tasks = len(model.heads)
    eye = torch.eye(n_tasks, device=x.device)

    def step() -> None:
        opt.zero_grad()
        losses = torch.stack(model.losses(x, y))
        grads = torch.autograd.grad(losses, params, eye, is_grads_batched=True)
        for param, grad in zip(params, grads):
            param.grad = grad.mean(0)
        opt.step()

    return Contender("floor", "", step, model)


def floor_z(template: MultiTaskModel, x: Tensor, y: Tensor) -> Contender:
    model = copy.deepcopy(template)
    opt = _sgd(list(model.parameters()))
    shared, heads = model.shared_parameters(), model.task_parameters()
    n_tasks = len(heads)

    def step() -> None:
        opt.zero_grad()
        z = model.features(x)
        z_grads = []
        for task, loss in enumerate(model.task_losses(z, y)):
            grad_z, *head_grads = torch.autograd.grad(loss, [z, *heads[task]], retain_graph=True)
            z_grads.append(grad_z)
            for param, grad in zip(heads[task], head_grads):
                param.grad = grad / n_tasks
        grads = torch.autograd.grad(z, shared, torch.stack(z_grads), is_grads_batched=True)
        for param, grad in zip(shared, grads):
            param.grad = grad.mean(0)
        opt.step()

    return Contender("floor-z", "", step, model)


def mtlopt(
    template: MultiTaskModel, x: Tensor, y: Tensor, method: Method, chunk_size: int | None = None
) -> Contender:
    model = copy.deepcopy(template)
    base = _sgd(list(model.parameters()))
    opt = MultiTaskOptimizer(base, weighting=method.build(), chunk_size=chunk_size)

    def step() -> None:
        opt.zero_grad()
        opt.step(model.losses(x, y))

    return Contender("mtlopt", method.name, step, model)


def mtlopt_rep(template: MultiTaskModel, x: Tensor, y: Tensor, method: Method) -> Contender:
    model = copy.deepcopy(template)
    opt = MultiTaskOptimizer(_sgd(list(model.parameters())), weighting=method.build())

    def step() -> None:
        opt.zero_grad()
        z = model.features(x)
        opt.step(model.task_losses(z, y), features=z)

    return Contender("mtlopt-rep", method.name, step, model)


def loop(template: MultiTaskModel, x: Tensor, y: Tensor, method: Method) -> Contender:
    model = copy.deepcopy(template)
    opt = _sgd(list(model.parameters()))
    weighting = method.build()
    shared, heads = model.shared_parameters(), model.task_parameters()
    n_tasks = len(heads)
    every_task = (1 << n_tasks) - 1  # bit mask: every task reaches every shared tensor

    def step() -> None:
        opt.zero_grad()
        losses = model.losses(x, y)
        per_task = []
        for task, loss in enumerate(losses):
            grads = torch.autograd.grad(loss, shared + heads[task], retain_graph=task < n_tasks - 1)
            per_task.append(grads[: len(shared)])
            for param, grad in zip(heads[task], grads[len(shared) :]):
                param.grad = grad
        blocks = [torch.stack(parts) for parts in zip(*per_task)]
        values = torch.stack([loss.detach() for loss in losses]).double()
        scale = weighting.loss_weights(values)
        if scale is not None:  # loss-balancing part of a hybrid method (e.g. IMTL)
            for block in blocks:
                block.mul_(scale.to(block.dtype).reshape(-1, *[1] * (block.dim() - 1)))
            for task, params in enumerate(heads):
                for param in params:
                    param.grad.mul_(scale[task].to(param.dtype))
        if method.needs == "gramian":
            gram = sum((b.reshape(n_tasks, -1) @ b.reshape(n_tasks, -1).T).double() for b in blocks)
            weights = weighting.weights_from_gramian(gram, values)
            updates = [torch.tensordot(weights.to(b.dtype), b, dims=1) for b in blocks]
        else:
            updates, _ = weighting.update_from_jacobian(blocks, values, [every_task] * len(blocks))
        for param, update in zip(shared, updates):
            param.grad = update.reshape(param.shape)
        weighting.observe(values, after_step=False)
        opt.step()

    return Contender("loop", method.name, step, model)


def torchjd(template: MultiTaskModel, x: Tensor, y: Tensor, method: Method) -> Contender:
    from torchjd.autojac import jac_to_grad, mtl_backward

    model = copy.deepcopy(template)
    n_tasks = len(model.heads)
    assert method.torchjd is not None
    combiner = method.torchjd(n_tasks).to(x.device)
    if method.torchjd_kind == "scalarizer":
        opt = _sgd(list(model.parameters()) + list(combiner.parameters()))

        def step() -> None:
            opt.zero_grad()
            combiner(torch.stack(model.losses(x, y))).backward()
            opt.step()

    else:
        opt = _sgd(list(model.parameters()))
        shared = model.shared_parameters()

        def step() -> None:
            opt.zero_grad()
            z = model.features(x)
            mtl_backward(model.task_losses(z, y), features=z)
            jac_to_grad(shared, combiner)
            opt.step()

    return Contender("torchjd", method.name, step, model)


def build_contenders(
    template: MultiTaskModel,
    x: Tensor,
    y: Tensor,
    methods: list[Method],
    with_torchjd: bool,
    with_representation: bool,
) -> tuple[list[Contender], list[str]]:
    """Every contender for one workload and m (plain and floor, then per method), and a note
    for each one that could not be built."""
    builders: list[tuple[str, Callable[[], Contender]]] = [
        ("plain", lambda: plain(template, x, y)),
        ("floor", lambda: floor(template, x, y)),
        ("floor-z", lambda: floor_z(template, x, y)),
    ]
    for method in methods:
        builders.append((f"mtlopt {method.name}", lambda m=method: mtlopt(template, x, y, m)))
        if method.exact:
            builders.append((f"loop {method.name}", lambda m=method: loop(template, x, y, m)))
        if with_torchjd and method.torchjd is not None:
            builders.append((f"torchjd {method.name}", lambda m=method: torchjd(template, x, y, m)))
        if with_representation and method.needs == "gramian":
            builders.append(
                (f"mtlopt-rep {method.name}", lambda m=method: mtlopt_rep(template, x, y, m))
            )
    contenders, notes = [], []
    for label, build in builders:
        try:
            contenders.append(build())
        except Exception as error:  # noqa: BLE001 - noted, the run goes on
            notes.append(f"{label}: could not be built ({error!r})")
    return contenders, notes
