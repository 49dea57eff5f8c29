"""JacobianEngine.rows_vjp: batched ``R @ J`` against an independent loop of autograd.grad."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from mtlopt import MultiTaskOptimizer
from mtlopt.jacobian import JacobianEngine

pytestmark = pytest.mark.filterwarnings(
    "ignore:There is a performance drop because we have not yet implemented the batching rule"
)

M = 3
DTYPE = torch.float64
RTOL, ATOL = 1e-9, 1e-12

Case = tuple[list[nn.Parameter], Callable[[], list[Tensor]]]


# --------------------------------------------------------------------------- reference helpers


def reference_jacobian(losses: list[Tensor], params: list[Tensor]) -> list[Tensor | None]:
    """Per param: ``[m, *shape]`` stacked per-task gradients (zeros where one task does not
    reach it), or None if no task reaches it. One plain autograd.grad call per loss."""
    per_task = [
        torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in losses
    ]
    blocks: list[Tensor | None] = []
    for k, p in enumerate(params):
        parts = [grads[k] for grads in per_task]
        if all(g is None for g in parts):
            blocks.append(None)
        else:
            blocks.append(torch.stack([torch.zeros_like(p) if g is None else g for g in parts]))
    return blocks


def rows_times(rows: Tensor, jac: list[Tensor | None]) -> list[Tensor | None]:
    return [None if b is None else torch.einsum("rm,m...->r...", rows, b) for b in jac]


def assert_blocks_close(got: list[Tensor | None], want: list[Tensor | None]) -> None:
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None, f"block {k}: expected None, got shape {tuple(g.shape)}"
            continue
        assert g is not None, f"block {k}: expected shape {tuple(w.shape)}, got None"
        assert g.shape == w.shape, (k, g.shape, w.shape)
        assert g.dtype == w.dtype, (k, g.dtype, w.dtype)
        torch.testing.assert_close(g, w, rtol=RTOL, atol=ATOL, msg=f"block {k}")


def mse_heads(z: Tensor, heads: nn.ModuleList, y: Tensor) -> list[Tensor]:
    return [((h(z).squeeze(-1) - y[:, i]) ** 2).mean() for i, h in enumerate(heads)]


def mse_columns(out: Tensor, y: Tensor) -> list[Tensor]:
    """Multi-output head: task i is column i."""
    return [((out[:, i] - y[:, i]) ** 2).mean() for i in range(out.shape[1])]


# --------------------------------------------------------------------------- small models
# Each builder returns (params, losses_fn); losses_fn() builds a fresh graph.


def build_linear() -> Case:
    trunk = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh())
    heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(M))
    net = nn.ModuleList([trunk, heads]).to(DTYPE)
    x, y = torch.randn(4, 5, dtype=DTYPE), torch.randn(4, M, dtype=DTYPE)
    return list(net.parameters()), lambda: mse_heads(trunk(x), heads, y)


def build_conv() -> Case:
    trunk = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten())
    heads = nn.ModuleList(nn.Linear(3 * 4 * 4, 1) for _ in range(M))
    net = nn.ModuleList([trunk, heads]).to(DTYPE)
    x, y = torch.randn(2, 2, 4, 4, dtype=DTYPE), torch.randn(2, M, dtype=DTYPE)
    return list(net.parameters()), lambda: mse_heads(trunk(x), heads, y)


def build_batchnorm() -> Case:
    trunk = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten()
    )
    heads = nn.ModuleList(nn.Linear(3 * 4 * 4, 1) for _ in range(M))
    net = nn.ModuleList([trunk, heads]).to(DTYPE).train()
    x, y = torch.randn(3, 2, 4, 4, dtype=DTYPE), torch.randn(3, M, dtype=DTYPE)
    return list(net.parameters()), lambda: mse_heads(trunk(x), heads, y)


def build_layernorm() -> Case:
    trunk = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh())
    head = nn.Linear(6, M)  # one multi-output head
    net = nn.ModuleList([trunk, head]).to(DTYPE)
    x, y = torch.randn(4, 5, dtype=DTYPE), torch.randn(4, M, dtype=DTYPE)
    return list(net.parameters()), lambda: mse_columns(head(trunk(x)), y)


def build_embedding() -> Case:
    emb = nn.Embedding(10, 4)
    heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(M))
    net = nn.ModuleList([emb, heads]).to(DTYPE)
    idx = torch.tensor([[1, 3, 3, 7], [0, 3, 9, 2]])
    y = torch.randn(2, M, dtype=DTYPE)
    return list(net.parameters()), lambda: mse_heads(emb(idx).mean(1), heads, y)


def build_lstm() -> Case:
    lstm = nn.LSTM(3, 4, batch_first=True)
    head = nn.Linear(4, M)
    net = nn.ModuleList([lstm, head]).to(DTYPE)
    x, y = torch.randn(2, 5, 3, dtype=DTYPE), torch.randn(2, M, dtype=DTYPE)
    return list(net.parameters()), lambda: mse_columns(head(lstm(x)[0][:, -1]), y)


def build_attention() -> Case:
    attn = nn.MultiheadAttention(4, 2, batch_first=True)
    heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(M))
    net = nn.ModuleList([attn, heads]).to(DTYPE).train()
    x, y = torch.randn(2, 3, 4, dtype=DTYPE), torch.randn(2, M, dtype=DTYPE)

    def losses() -> list[Tensor]:
        z, _ = attn(x, x, x, need_weights=False)
        return mse_heads(z.mean(1), heads, y)

    return list(net.parameters()), losses


MODELS = {
    "linear": build_linear,
    "conv2d": build_conv,
    "batchnorm2d": build_batchnorm,
    "layernorm": build_layernorm,
    "embedding": build_embedding,
    "lstm": build_lstm,
    "attention": build_attention,
}


def make_case(name: str, seed: int = 0) -> Case:
    torch.manual_seed(seed)
    return MODELS[name]()


# --------------------------------------------------------------------------- batched == loop


@pytest.mark.parametrize("chunk_size", [None, 1, 2])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_identity_rows_match_reference(model: str, chunk_size: int | None) -> None:
    params, losses_fn = make_case(model)
    losses = losses_fn()
    want = reference_jacobian(losses, params)
    assert all(b is not None for b in want)  # every parameter of these models is reached
    engine = JacobianEngine(chunk_size=chunk_size, mode="batched")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = engine.rows_vjp(torch.stack(losses), params, torch.eye(M, dtype=DTYPE))
    assert_blocks_close(got, want)
    assert engine.fallback_reason is None and not engine.uses_loop


@pytest.mark.parametrize("model", sorted(MODELS))
def test_auto_mode_batches_without_fallback(model: str) -> None:
    params, losses_fn = make_case(model, seed=1)
    engine = JacobianEngine(chunk_size=2, mode="auto")
    for _ in range(2):  # second call: batched already succeeded, graph may be freed
        losses = losses_fn()
        want = reference_jacobian(losses, params)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            got = engine.rows_vjp(torch.stack(losses), params, torch.eye(M, dtype=DTYPE))
        assert_blocks_close(got, want)
    assert engine.fallback_reason is None


@pytest.mark.parametrize("chunk_size", [None, 1, 2])
@pytest.mark.parametrize("model", ["linear", "conv2d", "lstm", "attention"])
def test_arbitrary_rows(model: str, chunk_size: int | None) -> None:
    params, losses_fn = make_case(model, seed=2)
    losses = losses_fn()
    jac = reference_jacobian(losses, params)
    rows = torch.randn(2, M, dtype=DTYPE)
    engine = JacobianEngine(chunk_size=chunk_size, mode="batched")
    got = engine.rows_vjp(torch.stack(losses), params, rows, retain_graph=True)
    assert_blocks_close(got, rows_times(rows, jac))
    # more rows than tasks, and a chunk size that does not divide the row count
    rows5 = torch.randn(5, M, dtype=DTYPE)
    got5 = engine.rows_vjp(torch.stack(losses), params, rows5)
    assert_blocks_close(got5, rows_times(rows5, jac))


@pytest.mark.parametrize("mode", ["auto", "batched", "loop"])
def test_loop_and_batched_modes_agree(mode: str) -> None:
    params, losses_fn = make_case("linear", seed=3)
    losses = losses_fn()
    want = reference_jacobian(losses, params)
    got = JacobianEngine(chunk_size=2, mode=mode).rows_vjp(
        torch.stack(losses), params, torch.eye(M, dtype=DTYPE)
    )
    assert_blocks_close(got, want)


def test_retain_graph_false_frees_graph_after_batched_success() -> None:
    params, losses_fn = make_case("linear", seed=4)
    engine = JacobianEngine(mode="batched")
    output = torch.stack(losses_fn())
    engine.rows_vjp(output, params, torch.eye(M, dtype=DTYPE))  # retain_graph=False
    with pytest.raises(RuntimeError):
        torch.autograd.grad(output.sum(), params)
    output = torch.stack(losses_fn())
    engine.rows_vjp(output, params, torch.eye(M, dtype=DTYPE), retain_graph=True)
    torch.autograd.grad(output.sum(), params)  # still usable


def test_retain_grad_tensor_in_graph_batches() -> None:
    """In this torch version a ``.retain_grad()`` tensor does not break vmap."""
    torch.manual_seed(5)
    trunk = nn.Linear(4, 4).to(DTYPE)
    heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(M)).to(DTYPE)
    x, y = torch.randn(3, 4, dtype=DTYPE), torch.randn(3, M, dtype=DTYPE)
    z = torch.tanh(trunk(x))
    z.retain_grad()
    losses = mse_heads(z, heads, y)
    params = [*trunk.parameters(), *heads.parameters()]
    want = reference_jacobian(losses, params)
    engine = JacobianEngine(mode="batched")
    assert_blocks_close(engine.rows_vjp(torch.stack(losses), params, torch.eye(M, dtype=DTYPE)), want)


# --------------------------------------------------------------------------- None blocks, one row


def _with_unused() -> tuple[list[Tensor], list[Tensor], list[bool]]:
    torch.manual_seed(6)
    trunk = nn.Linear(4, 5).to(DTYPE)
    heads = nn.ModuleList(nn.Linear(5, 1) for _ in range(M)).to(DTYPE)
    unused = nn.Linear(2, 2).to(DTYPE)
    frozen_input = torch.randn(3, requires_grad=True, dtype=DTYPE)  # never used
    x, y = torch.randn(3, 4, dtype=DTYPE), torch.randn(3, M, dtype=DTYPE)
    losses = mse_heads(torch.tanh(trunk(x)), heads, y)
    params = [unused.weight, *trunk.parameters(), frozen_input, *heads.parameters(), unused.bias]
    reached = [True] * len(params)
    reached[0] = reached[3] = reached[-1] = False
    return losses, params, reached


@pytest.mark.parametrize("chunk_size", [None, 1, 2])
@pytest.mark.parametrize("mode", ["auto", "batched", "loop"])
def test_unreached_inputs_give_none(mode: str, chunk_size: int | None) -> None:
    losses, params, reached = _with_unused()
    want = reference_jacobian(losses, params)
    assert [b is not None for b in want] == reached
    engine = JacobianEngine(chunk_size=chunk_size, mode=mode)
    got = engine.rows_vjp(torch.stack(losses), params, torch.eye(M, dtype=DTYPE), retain_graph=True)
    assert_blocks_close(got, want)
    # the caller's ``reached`` spares the graph walk and gives the same answer
    got2 = engine.rows_vjp(torch.stack(losses), params, torch.eye(M, dtype=DTYPE), True, reached)
    assert_blocks_close(got2, want)


def test_no_input_reached_returns_all_none() -> None:
    torch.manual_seed(7)
    lin = nn.Linear(3, M).to(DTYPE)
    other = [torch.randn(2, requires_grad=True, dtype=DTYPE), nn.Linear(2, 2).weight]
    losses = list(lin(torch.randn(2, 3, dtype=DTYPE)).pow(2).mean(0).unbind())
    got = JacobianEngine(mode="batched").rows_vjp(torch.stack(losses), other, torch.eye(M, dtype=DTYPE))
    assert got == [None, None]


def test_single_row_does_not_use_vmap(monkeypatch: pytest.MonkeyPatch) -> None:
    losses, params, reached = _with_unused()
    jac = reference_jacobian(losses, params)

    def no_vmap(*args: object, **kwargs: object) -> None:
        raise AssertionError("vmap must not be called for a single row")

    monkeypatch.setattr(torch.func, "vmap", no_vmap)
    row = torch.tensor([[0.5, -2.0, 3.0]], dtype=DTYPE)
    engine = JacobianEngine(mode="batched")
    got = engine.rows_vjp(torch.stack(losses), params, row)
    assert_blocks_close(got, rows_times(row, jac))
    assert engine.fallback_reason is None


def test_single_task_identity() -> None:
    torch.manual_seed(8)
    lin = nn.Linear(3, 2).to(DTYPE)
    loss = lin(torch.randn(4, 3, dtype=DTYPE)).pow(2).mean()
    want = torch.autograd.grad(loss, list(lin.parameters()), retain_graph=True)
    got = JacobianEngine(chunk_size=1).rows_vjp(
        loss.reshape(1), list(lin.parameters()), torch.ones(1, 1, dtype=DTYPE)
    )
    assert_blocks_close(got, [g.unsqueeze(0) for g in want])


# --------------------------------------------------------------------------- fallback


class ItemBackward(torch.autograd.Function):
    """Multiplies by 2; its backward calls ``.item()``, which vmap cannot batch."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: ANN001
        return x * 2

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ANN001
        scale = 2.0 + 0.0 * grad.sum().item()
        return grad * scale


def _unbatchable(seed: int) -> tuple[list[Tensor], list[Tensor]]:
    torch.manual_seed(seed)
    trunk = nn.Linear(4, 5).to(DTYPE)
    heads = nn.ModuleList(nn.Linear(5, 1) for _ in range(M)).to(DTYPE)
    x, y = torch.randn(3, 4, dtype=DTYPE), torch.randn(3, M, dtype=DTYPE)
    z = torch.tanh(ItemBackward.apply(trunk(x)))
    return mse_heads(z, heads, y), [*trunk.parameters(), *heads.parameters()]


def _runtime_warnings(records: list[warnings.WarningMessage]) -> list[str]:
    return [str(r.message) for r in records if issubclass(r.category, RuntimeWarning)]


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_auto_falls_back_once_with_warning(chunk_size: int | None) -> None:
    losses, params = _unbatchable(9)
    want = reference_jacobian(losses, params)
    engine = JacobianEngine(chunk_size=chunk_size, mode="auto")
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        got = engine.rows_vjp(torch.stack(losses), params, torch.eye(M, dtype=DTYPE))
    messages = _runtime_warnings(records)
    assert len(messages) == 1, messages
    assert engine.fallback_reason is not None
    assert ".item()" in engine.fallback_reason
    assert engine.fallback_reason in messages[0]
    assert "loop" in messages[0]
    assert engine.uses_loop
    assert_blocks_close(got, want)

    # second call on a new graph: the loop straight away, no second warning
    losses, params = _unbatchable(10)
    want = reference_jacobian(losses, params)
    reason = engine.fallback_reason
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        got = engine.rows_vjp(torch.stack(losses), params, torch.eye(M, dtype=DTYPE))
    assert _runtime_warnings(records) == []
    assert engine.fallback_reason == reason
    assert_blocks_close(got, want)


def test_auto_fallback_with_pytest_warns() -> None:
    losses, params = _unbatchable(11)
    rows = torch.randn(2, M, dtype=DTYPE)
    want = rows_times(rows, reference_jacobian(losses, params))
    engine = JacobianEngine(mode="auto")
    with pytest.warns(RuntimeWarning, match=r"\.item\(\)") as record:
        got = engine.rows_vjp(torch.stack(losses), params, rows)
    assert len([r for r in record if issubclass(r.category, RuntimeWarning)]) == 1
    assert_blocks_close(got, want)


@pytest.mark.parametrize("retain_graph", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_batched_mode_raises_instead_of_falling_back(
    retain_graph: bool, chunk_size: int | None
) -> None:
    losses, params = _unbatchable(12)
    engine = JacobianEngine(chunk_size=chunk_size, mode="batched")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(RuntimeError, match="vmap"):
            engine.rows_vjp(
                torch.stack(losses), params, torch.eye(M, dtype=DTYPE), retain_graph=retain_graph
            )
    assert engine.fallback_reason is None and not engine.uses_loop


@pytest.mark.parametrize("chunk_size", [None, 1])
def test_loop_mode_handles_unbatchable_graph_silently(chunk_size: int | None) -> None:
    losses, params = _unbatchable(13)
    want = reference_jacobian(losses, params)
    engine = JacobianEngine(chunk_size=chunk_size, mode="loop")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = engine.rows_vjp(torch.stack(losses), params, torch.eye(M, dtype=DTYPE))
    assert_blocks_close(got, want)
    assert engine.fallback_reason is None and engine.uses_loop


def test_single_row_of_unbatchable_graph_in_batched_mode() -> None:
    losses, params = _unbatchable(14)
    row = torch.randn(1, M, dtype=DTYPE)
    want = rows_times(row, reference_jacobian(losses, params))
    engine = JacobianEngine(mode="batched")
    assert_blocks_close(engine.rows_vjp(torch.stack(losses), params, row), want)
    assert engine.fallback_reason is None


# --------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize("chunk_size", [0, -1, 1.5, True, False, "2", 2.0])
def test_invalid_chunk_size(chunk_size: object) -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        JacobianEngine(chunk_size=chunk_size)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["vmap", "", "Auto", None, "loops"])
def test_invalid_mode(mode: object) -> None:
    # The message names the user-facing argument of MultiTaskOptimizer (``jacobian``).
    with pytest.raises(ValueError, match="jacobian") as info:
        JacobianEngine(mode=mode)  # type: ignore[arg-type]
    assert repr(mode) in str(info.value)


def test_invalid_arguments_via_optimizer() -> None:
    lin = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="chunk_size"):
        MultiTaskOptimizer(torch.optim.SGD(lin.parameters(), lr=0.1), chunk_size=0)
    with pytest.raises(ValueError, match="jacobian"):
        MultiTaskOptimizer(torch.optim.SGD(lin.parameters(), lr=0.1), jacobian="fast")


@pytest.mark.parametrize("chunk_size", [None, 1, 7])
def test_valid_arguments(chunk_size: int | None) -> None:
    for mode in ("auto", "batched", "loop"):
        engine = JacobianEngine(chunk_size=chunk_size, mode=mode)
        assert engine.chunk_size == chunk_size and engine.mode == mode
        assert engine.fallback_reason is None
        assert engine.uses_loop == (mode == "loop")


# --------------------------------------------------------------------------- known bugs


class NoneGradFor2nd(torch.autograd.Function):
    """``x * 2 + w`` whose backward returns None (an undefined gradient) for ``w``."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:  # noqa: ANN001
        return x * 2 + w

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: ANN001
        return grad * 2, None


def test_non_leaf_input_gets_its_gradient() -> None:
    torch.manual_seed(15)
    lin = nn.Linear(3, 2).to(DTYPE)
    h = lin(torch.randn(4, 3, dtype=DTYPE))
    losses = [h[:, 0].sum(), h[:, 1].pow(2).sum()]
    want = reference_jacobian(losses, [h])
    assert want[0] is not None
    got = JacobianEngine(mode="batched").rows_vjp(
        torch.stack(losses), [h], torch.eye(2, dtype=DTYPE), retain_graph=True
    )
    assert_blocks_close(got, want)


def test_structurally_reached_but_undefined_gradient() -> None:
    torch.manual_seed(16)
    lin = nn.Linear(3, 2).to(DTYPE)
    w = torch.randn(2, dtype=DTYPE, requires_grad=True)
    h = NoneGradFor2nd.apply(lin(torch.randn(4, 3, dtype=DTYPE)), w)
    losses = [h[:, 0].sum(), h[:, 1].pow(2).sum()]
    params = [w, lin.weight]
    want = reference_jacobian(losses, params)
    assert want[0] is None
    got = JacobianEngine(mode="batched").rows_vjp(
        torch.stack(losses), params, torch.eye(2, dtype=DTYPE)
    )
    assert got[0] is None or torch.count_nonzero(got[0]) == 0
    torch.testing.assert_close(got[1], want[1], rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------- property test


@settings(max_examples=15, deadline=None)
@given(
    m=st.integers(1, 5),
    n_in=st.integers(1, 4),
    hidden=st.lists(st.integers(1, 5), min_size=0, max_size=2),
    chunk_size=st.one_of(st.none(), st.integers(1, 6)),
    n_rows=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_property_batched_equals_loop(
    m: int, n_in: int, hidden: list[int], chunk_size: int | None, n_rows: int, seed: int
) -> None:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = n_in
    for h in hidden:
        layers += [nn.Linear(width, h), nn.Tanh()]
        width = h
    trunk = nn.Sequential(*layers).to(DTYPE)
    heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(m)).to(DTYPE)
    x, y = torch.randn(3, n_in, dtype=DTYPE), torch.randn(3, m, dtype=DTYPE)
    losses = mse_heads(trunk(x), heads, y)
    params = [*trunk.parameters(), *heads.parameters()]
    jac = reference_jacobian(losses, params)

    engine = JacobianEngine(chunk_size=chunk_size, mode="batched")
    got = engine.rows_vjp(torch.stack(losses), params, torch.eye(m, dtype=DTYPE), retain_graph=True)
    assert_blocks_close(got, jac)

    rows = torch.randn(n_rows, m, dtype=DTYPE)
    got = engine.rows_vjp(torch.stack(losses), params, rows)
    assert_blocks_close(got, rows_times(rows, jac))
