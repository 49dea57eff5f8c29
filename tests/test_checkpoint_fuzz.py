"""Checkpoint fuzzing: stop at a random step, save, load (weights_only, map_location),
resume: identical to never stopping. Other configurations and formats are refused."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtlopt import MultiTaskOptimizer
from mtlopt.weighting.base import REGISTRY

from .conftest import Net, make_batch, make_optimizer
from .method_kit import FACTORIES, FIXED_TASKS
from .test_catalogue_resume import Batches, build, run

pytestmark = pytest.mark.filterwarnings("ignore:.*finished \\(Adam-like\\) step")

STATEFUL = sorted(
    name
    for name, cls in REGISTRY.items()
    if cls.stateful and name in FACTORIES and FIXED_TASKS.get(name, 3) == 3
)
TOTAL = 7
#: Resumes tried per method (the count goes into the README's robustness report).
EXAMPLES = 4


def save_load(state: dict, **load_options: object) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True, **load_options)


@pytest.mark.parametrize("name", STATEFUL)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stop_at=st.integers(1, TOTAL - 1), map_location=st.sampled_from([None, "cpu"]))
def test_fuzzed_resume_is_bit_identical(name: str, stop_at: int, map_location: str | None) -> None:
    net_a, opt_a = build(name, 0)
    run(net_a, opt_a, Batches(net_a), TOTAL)

    net_b, opt_b = build(name, 0)
    batches = Batches(net_b)
    run(net_b, opt_b, batches, stop_at)
    saved = save_load(
        {"model": net_b.state_dict(), "opt": opt_b.state_dict(), "drawn": batches.drawn},
        map_location=map_location,
    )
    net_c, opt_c = build(name, 99)
    net_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    run(net_c, opt_c, Batches(net_c, saved["drawn"]), TOTAL - stop_at)
    for p, q in zip(net_a.parameters(), net_c.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("name", STATEFUL)
def test_resume_after_a_dtype_change_of_the_model(name: str) -> None:
    net, opt = build(name, 0)
    batches = Batches(net)
    run(net, opt, batches, 3)
    saved = save_load({"model": net.state_dict(), "opt": opt.state_dict()})
    torch.manual_seed(5)
    net64 = Net().double()
    net64.load_state_dict(saved["model"])
    opt64 = make_optimizer(net64, FACTORIES[name](), base="sgd")
    opt64.load_state_dict(saved["opt"])

    drawn = iter(range(3, 100))

    def batches64() -> list[torch.Tensor]:
        x, y = make_batch(next(drawn))
        return net64.losses(x.double(), y.double())

    for _ in range(3):
        opt64.zero_grad()
        opt64.step(batches64)
    assert all(torch.isfinite(p).all() and p.dtype == torch.float64 for p in net64.parameters())


@pytest.mark.parametrize("name", STATEFUL)
def test_checkpoint_of_another_method_is_refused_naming_both(name: str) -> None:
    net, opt = build(name, 0)
    run(net, opt, Batches(net), 2)
    other = "GradVac" if name != "GradVac" else "ExcessMTL"
    torch.manual_seed(0)
    net2 = Net()
    opt2 = make_optimizer(net2, FACTORIES[other](), base="sgd")
    state = copy.deepcopy(opt2.state_dict())
    with pytest.raises(ValueError, match=f"saved with weighting {name}.*uses {other}"):
        opt2.load_state_dict(save_load(opt.state_dict()))
    assert str(opt2.state_dict()) == str(state)


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_unknown_format_versions_are_refused(version: object) -> None:
    net, opt = build("GradVac", 0)
    state = opt.state_dict()
    state["mtlopt"]["version"] = version
    with pytest.raises(ValueError, match=f"version {version!r} is not supported"):
        opt.load_state_dict(state)


def test_other_number_of_tasks_is_refused_naming_the_counts() -> None:
    net, opt = build("GradVac", 0)
    run(net, opt, Batches(net), 1)
    torch.manual_seed(0)
    net4 = Net(n_tasks=4)
    opt4 = MultiTaskOptimizer(torch.optim.SGD(net4.parameters(), lr=0.1), weighting=FACTORIES["GradVac"]())
    opt4.step(net4.losses(torch.randn(16, 6), torch.randn(16, 4)))
    single = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), weighting=FACTORIES["GradVac"]())
    single.step(net.losses(torch.randn(16, 6), torch.randn(16, 3)))
    with pytest.raises(ValueError, match="saved for 3 tasks.*has 4"):
        opt4.load_state_dict(single.state_dict())
