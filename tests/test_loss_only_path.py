"""The loss-only step's direct path: one backward straight into ``.grad`` (mtlopt.loss_only)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtlopt import MultiTaskOptimizer, NonFiniteError
from mtlopt import gradients as gradients_module
from mtlopt.weighting import Constant

from .conftest import Net
from .references import batch64 as make_batch

WEIGHTS = (0.5, 2.0, 0.25)


def reference_grads(net: Net, params: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    losses = net.losses(*make_batch(step))
    total = sum(c * loss for c, loss in zip(WEIGHTS, losses))
    return list(torch.autograd.grad(total, params))


def optimizer(net: Net, params: list[torch.Tensor]) -> MultiTaskOptimizer:
    return MultiTaskOptimizer(torch.optim.SGD(params, lr=0.0), weighting=Constant(WEIGHTS))


def prepared() -> tuple[Net, list[torch.Tensor], list[torch.Tensor], MultiTaskOptimizer]:
    """A seeded net, its parameters, their reference gradients and a zeroed optimizer."""
    torch.manual_seed(0)
    net = Net().double()
    params = [*net.encoder.parameters(), *net.heads.parameters()]
    want = reference_grads(net, params, 0)
    opt = optimizer(net, params)
    opt.zero_grad()
    return net, params, want, opt


def assert_grads(params: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for p, g in zip(params, want):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)


@pytest.fixture
def count_general_path(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    general = gradients_module.per_task_gradients

    def counting(*args, **kwargs):
        calls.append(1)
        return general(*args, **kwargs)

    monkeypatch.setattr("mtlopt.optimizer.per_task_gradients", counting)
    return calls


def test_direct_path_writes_the_weighted_sum(count_general_path: list[int]) -> None:
    net, params, want, opt = prepared()
    opt.step(net.losses(*make_batch(0)))
    assert not count_general_path
    assert_grads(params, want)
    assert opt.last_step[0].weights.tolist() == list(WEIGHTS)
    assert net.unused.weight.grad is None  # reached by no loss


class TaggedParameter(nn.Parameter):
    """A Parameter subclass that overrides ``__torch_function__`` (as DTensor does): the
    direct path hands it to the public torch.autograd.backward."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return super().__torch_function__(func, types, args, kwargs or {})


def test_parameter_subclass_takes_the_public_backward(
    count_general_path: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    net = Net().double()
    net.encoder[0].weight = TaggedParameter(net.encoder[0].weight.detach().clone())
    params = [*net.encoder.parameters(), *net.heads.parameters()]
    want = reference_grads(net, params, 0)
    public = []
    backward = torch.autograd.backward
    monkeypatch.setattr(
        torch.autograd, "backward", lambda *a, **k: public.append(1) or backward(*a, **k)
    )
    opt = optimizer(net, params)
    opt.zero_grad()
    opt.step(net.losses(*make_batch(0)))
    assert public and not count_general_path
    assert_grads(params, want)


def test_parameter_outside_the_optimizer_gets_no_grad(count_general_path: list[int]) -> None:
    torch.manual_seed(0)
    net = Net().double()
    opt = optimizer(net, list(net.heads.parameters()))  # the encoder is not optimised here
    opt.zero_grad()
    opt.step(net.losses(*make_batch(0)))
    assert not count_general_path
    assert all(p.grad is None for p in net.encoder.parameters())
    assert all(p.grad is not None for p in net.heads.parameters())


def test_existing_grads_take_the_general_path(count_general_path: list[int]) -> None:
    torch.manual_seed(0)
    net = Net().double()
    params = [*net.encoder.parameters(), *net.heads.parameters()]
    want = [2 * g for g in reference_grads(net, params, 0)]
    opt = optimizer(net, params)
    opt.zero_grad()
    opt.backward(net.losses(*make_batch(0)))
    opt.backward(net.losses(*make_batch(0)))  # accumulates, as loss.backward() would
    assert len(count_general_path) == 1
    for p, g in zip(params, want):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)


class SqrtNet(nn.Module):
    """Finite losses whose gradient is infinite: sqrt at 0."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Parameter(torch.tensor([0.0, 1.0], dtype=torch.float64))

    def losses(self) -> list[torch.Tensor]:
        return [self.shared[0].sqrt(), self.shared[1] ** 2, self.shared.sum()]


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_non_finite_gradient_leaves_everything_untouched(policy: str) -> None:
    net = SqrtNet()
    inner = torch.optim.SGD(net.parameters(), lr=0.1)
    opt = MultiTaskOptimizer(inner, weighting=Constant(WEIGHTS), nonfinite=policy)
    before = net.shared.detach().clone()
    opt.zero_grad()
    if policy == "raise":
        with pytest.raises(NonFiniteError, match="not finite"):
            opt.step(net.losses())
    else:
        opt.step(net.losses())
        assert opt.skipped_steps == 1
    assert net.shared.grad is None
    assert torch.equal(net.shared.detach(), before)


@pytest.mark.parametrize(
    "values, expected",
    [
        ([1.0, 2.0], True),
        ([float("nan"), 2.0], False),
        ([float("inf"), 2.0], False),
        ([-float("inf"), 2.0], False),
        ([3e38, 3e38], True),  # the norm overflows, the entries are finite
    ],
)
def test_all_finite_against_isfinite(values: list[float], expected: bool) -> None:
    from mtlopt.finiteness import all_finite

    tensors = [torch.tensor(values), torch.ones(3, dtype=torch.float64), torch.ones(2, 2).T]
    before = [t.clone() for t in tensors]
    assert all_finite(tensors) is expected
    for tensor, old in zip(tensors, before):  # checked, not changed
        assert torch.equal(tensor.nan_to_num(), old.nan_to_num())
    assert all_finite([torch.ones(2)], also=torch.tensor(values, dtype=torch.float64)) is expected
    assert all_finite([]) is True
    sparse = torch.sparse_coo_tensor([[0, 1]], torch.tensor(values), (3,))  # the fallback
    assert all_finite([sparse, torch.ones(3)]) is expected


def test_last_step_does_not_keep_the_gradients_alive() -> None:
    import gc
    import weakref

    torch.manual_seed(0)
    for weighting in ("mean", "upgrad"):
        net = Net().double()
        opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), weighting=weighting)
        opt.step(net.losses(*make_batch(0)))
        grads = [weakref.ref(p.grad) for p in net.parameters() if p.grad is not None]
        opt.zero_grad()
        gc.collect()
        assert grads and all(ref() is None for ref in grads), weighting
        assert opt.last_step[0].weights is not None


def test_sparse_embedding_gradients() -> None:
    torch.manual_seed(0)
    embedding = nn.Embedding(10, 4, sparse=True)
    heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(2))
    index = torch.tensor([1, 3, 3, 7])

    def losses(broken: bool = False) -> list[torch.Tensor]:
        z = embedding(index)
        if broken:  # sqrt(0): finite losses, an infinite derivative
            z = z + torch.sqrt(z - z.detach())
        return [head(z).pow(2).mean() for head in heads]

    opt = MultiTaskOptimizer(torch.optim.SparseAdam(list(embedding.parameters()), lr=0.1))
    expected = torch.autograd.grad(sum(losses()) / 2, embedding.weight)[0].to_dense()
    before = embedding.weight.detach().clone()
    opt.backward(losses())
    assert embedding.weight.grad.is_sparse
    torch.testing.assert_close(embedding.weight.grad.to_dense(), expected)
    opt.step()
    assert not torch.equal(embedding.weight, before)
    opt.zero_grad()
    moved = embedding.weight.detach().clone()
    broken = losses(broken=True)
    assert all(bool(torch.isfinite(loss)) for loss in broken)
    with pytest.raises(NonFiniteError, match="gradients"):
        opt.step(broken)
    assert embedding.weight.grad is None and torch.equal(embedding.weight, moved)


def test_plain_parameters_take_the_direct_engine_call(monkeypatch: pytest.MonkeyPatch) -> None:
    net, params, want, opt = prepared()

    def refuse(*args, **kwargs):
        raise AssertionError("the public torch.autograd.backward was called")

    monkeypatch.setattr(torch.autograd, "backward", refuse)
    opt.backward(net.losses(*make_batch(0)), retain_graph=None)  # None: as torch accepts it
    assert_grads(params, want)


def test_a_torch_function_mode_sees_the_public_backward() -> None:
    from torch.overrides import TorchFunctionMode

    class Recording(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[object] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.seen.append(func)
            return func(*args, **(kwargs or {}))

    net, params, want, opt = prepared()
    losses = net.losses(*make_batch(0))
    with Recording() as mode:
        opt.step(losses)
    assert torch.autograd.backward in mode.seen
    assert_grads(params, want)


@pytest.mark.parametrize("weighting", ["mean", "imtlg"])
def test_all_frozen_parameters_are_refused_before_anything_moves(weighting: str) -> None:
    frozen, other = nn.Linear(3, 3), nn.Linear(3, 2)
    for p in frozen.parameters():
        p.requires_grad_(False)
    opt = MultiTaskOptimizer(torch.optim.SGD(frozen.parameters(), lr=0.1), weighting=weighting)
    out = other(frozen(torch.randn(4, 3)))
    with pytest.raises(ValueError, match="no parameter of the optimizer requires grad"):
        opt.step([out[:, 0].mean(), out[:, 1].mean()])
    assert other.weight.grad is None  # outside the optimizer: never written


def test_loss_weights_of_the_wrong_shape_are_refused() -> None:
    class Broken(Constant, register=False):
        def loss_weights(self, losses: torch.Tensor) -> torch.Tensor:
            return torch.ones(1, dtype=torch.float64)  # one weight for three tasks

    torch.manual_seed(0)
    net = Net().double()
    params = [*net.encoder.parameters(), *net.heads.parameters()]
    opt = MultiTaskOptimizer(torch.optim.SGD(params, lr=0.1), weighting=Broken(WEIGHTS))
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"loss_weights should return a tensor of shape \(3,\)"):
        opt.step(net.losses(*make_batch(0)))
    assert all(p.grad is None for p in params)
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
