"""Models where vmap cannot run the backward: the optimizer falls back and gives the same numbers."""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

from mtlopt import MultiTaskOptimizer
from mtlopt.weighting import IMTLG


def norm_model(kind: str, compiled: str | None = None) -> tuple[list[nn.Parameter], Callable]:
    norm = nn.BatchNorm1d(16) if kind == "batchnorm" else nn.LayerNorm(16)
    encoder = nn.Sequential(nn.Linear(8, 16), norm, nn.ReLU())
    heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(3))
    forward = torch.compile(encoder, backend=compiled) if compiled else encoder
    bf16 = not compiled

    def losses(seed: int) -> list[torch.Tensor]:
        x = torch.randn(32, 8, generator=torch.Generator().manual_seed(seed))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            z = forward(x)
            outs = [head(z).float() for head in heads]
        return [out.pow(2).mean() for out in outs]

    return [*encoder.parameters(), *heads.parameters()], losses


def recurrent_model(kind: str) -> tuple[list[nn.Parameter], Callable]:
    rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(4, 8, batch_first=True)
    heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(3))

    def losses(seed: int) -> list[torch.Tensor]:
        x = torch.randn(5, 6, 4, generator=torch.Generator().manual_seed(seed))
        out, _ = rnn(x)
        return [head(out[:, -1]).pow(2).mean() for head in heads]

    return [*rnn.parameters(), *heads.parameters()], losses


MODELS = {
    "bf16-autocast-batchnorm": lambda: norm_model("batchnorm"),
    "bf16-autocast-layernorm": lambda: norm_model("layernorm"),
    "compiled-aot_eager": lambda: norm_model("layernorm", compiled="aot_eager"),
    "compiled-inductor": lambda: norm_model("layernorm", compiled="inductor"),
    "lstm": lambda: recurrent_model("lstm"),
    "gru": lambda: recurrent_model("gru"),
}


def gradients(params: list[nn.Parameter], losses: Callable, jacobian: str) -> tuple[list, list]:
    opt = MultiTaskOptimizer(torch.optim.SGD(params, lr=0.0), weighting=IMTLG(), jacobian=jacobian)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.zero_grad()
        opt.backward(losses(0))
    messages = [str(w.message) for w in caught if "mtlopt" in str(w.message)]
    return [p.grad.clone() for p in params], messages


#: Inductor compiles C++ for the CPU: it needs a compiler on the machine.
HAS_COMPILER = any(shutil.which(cc) for cc in ("g++", "clang++", "c++"))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_auto_mode_trains_and_matches_the_loop(name: str) -> None:
    if name == "compiled-inductor" and not HAS_COMPILER:
        pytest.skip("inductor needs a C++ compiler on the CPU")
    torch.manual_seed(0)
    params, losses = MODELS[name]()
    auto, messages = gradients(params, losses, "auto")
    loop, loop_messages = gradients(params, losses, "loop")
    assert loop_messages == []
    assert len(messages) <= 1  # warned at most once, with the reason
    if name.startswith(("bf16", "compiled")):
        assert messages and "loop of 3 backward passes" in messages[0]
    for a, b in zip(auto, loop):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
