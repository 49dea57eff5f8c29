"""On a CUDA device: the same updates as the CPU, and no host synchronisation but the
step's decisions.

CI has no GPU, so these tests skip there; they run wherever torch sees a CUDA device (the
figures of the last such run are in the README). On CUDA the Gramian weightings run on a
CPU copy of the Gramian by default (``mtlopt.host_solve``) or, with that switched off, on
their synchronisation-free tensor code (fixed iteration counts, no read-back); the CPU run
they are compared with takes the host shortcuts that stop when done, so agreement in
float64 checks the device code against an independent path (and, with the host solve, the
round trip of the Gramians and the weights). ``tests/test_host_paths.py``
and ``tests/test_device_syncs.py`` check the same code on the CPU in every CI run.
"""

from __future__ import annotations

import collections
import traceback
import warnings

import pytest
import torch

from mtlopt import MultiTaskOptimizer, host_solve

from .conftest import Net, make_batch
from .method_kit import FACTORIES, trained_parameters

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

#: Methods whose random draws come from a generator on the device (its stream differs from
#: the CPU's), or that need several batches per step: checked to run, not compared.
NOT_COMPARED = {"GradDrop", "MoDo", "SDMGrad"}
COMPARED = sorted(set(FACTORIES) - NOT_COMPARED)


def sync_limit(name: str, features: bool) -> int:
    """Waits allowed in one step of :func:`step_model` (two param groups): whether the
    losses are finite and whether the gradients are (the Gramians come back in that read);
    a loss-only weighting's comparison of the groups' loss weights; in representation mode,
    the read of z's Gramian for a weighting that runs on the host."""
    weighting = FACTORIES[name]()
    loss_only = weighting.needs == "losses"
    return 2 + loss_only + (features and weighting.solves_on_host)


def representation_ok(name: str) -> bool:
    weighting = FACTORIES[name]()
    return weighting.needs != "jacobian" and weighting.n_batches == 1


def assert_close_displacement(moved, reference, start, rtol: float) -> None:
    """The parameters' displacement from ``start`` agrees within ``rtol`` (in norm)."""
    diff = torch.cat([(a - b).flatten() for a, b in zip(moved, reference)]).norm()
    size = torch.cat([(b - s).flatten() for b, s in zip(reference, start)]).norm()
    assert diff <= rtol * size + 1e-12, (float(diff), float(size))


def start_parameters() -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [p.detach().to(torch.float64) for p in Net().parameters()]


@pytest.fixture(params=["host-solve", "device-solve"])
def solve_on(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gramian weightings on a CPU copy (the default), or on the GPU itself."""
    monkeypatch.setattr(host_solve, "ENABLED", request.param == "host-solve")


@pytest.mark.usefixtures("solve_on")
@pytest.mark.parametrize("name", COMPARED)
def test_float64_update_matches_the_cpu(name: str) -> None:
    on_cuda = trained_parameters(name, "cuda", torch.float64, features=False)
    on_cpu = trained_parameters(name, "cpu", torch.float64, features=False)
    assert_close_displacement(on_cuda, on_cpu, start_parameters(), rtol=1e-6)


@pytest.mark.usefixtures("solve_on")
@pytest.mark.parametrize("name", [n for n in COMPARED if representation_ok(n)])
def test_float64_representation_mode_matches_the_cpu(name: str) -> None:
    on_cuda = trained_parameters(name, "cuda", torch.float64, features=True)
    on_cpu = trained_parameters(name, "cpu", torch.float64, features=True)
    assert_close_displacement(on_cuda, on_cpu, start_parameters(), rtol=1e-6)


@pytest.mark.parametrize("name", ["UPGrad", "GradVac", "IMTLG", "MGDA", "CAGrad", "NashMTL"])
def test_float32_update_is_close_to_float64(name: str) -> None:
    on_cuda = trained_parameters(name, "cuda", torch.float32, features=False)
    on_cpu = trained_parameters(name, "cpu", torch.float64, features=False)
    assert_close_displacement(on_cuda, on_cpu, start_parameters(), rtol=1e-3)


@pytest.mark.parametrize("name", sorted(NOT_COMPARED))
def test_uncompared_methods_run(name: str) -> None:
    weighting = FACTORIES[name]()
    if weighting.n_batches > 1:
        pytest.skip("needs several batches per step (tested on the CPU)")
    moved = trained_parameters(name, "cuda", torch.float32, features=False)
    assert all(torch.isfinite(p).all() for p in moved)


def step_model(name: str, features: bool, steps: int = 4):
    """Yield ``(is_last, optimizer, losses, z)`` for ``steps`` steps of ``name`` on CUDA; the
    caller steps (the first steps warm every cache and create the weighting's state)."""
    torch.manual_seed(0)
    net = Net().cuda()
    groups = [{"params": net.encoder.parameters()}, {"params": net.heads.parameters()}]
    opt = MultiTaskOptimizer(torch.optim.SGD(groups, lr=0.05), weighting=FACTORIES[name]())
    batches = [tuple(t.cuda() for t in make_batch(seed)) for seed in range(steps)]
    for i, (x, y) in enumerate(batches):
        z = net.encoder(x)
        losses = [((h(z).squeeze(-1) - y[:, t]) ** 2).mean() for t, h in enumerate(net.heads)]
        yield i == steps - 1, opt, losses, z


def sync_sites(name: str, features: bool) -> collections.Counter[str]:
    """The synchronising CUDA calls in the last step of :func:`step_model`, by their
    innermost three mtlopt source lines (``benchmarks/sync_sites.py`` prints them)."""
    found: collections.Counter[str] = collections.Counter()

    def record(message: Warning | str, *args: object, **kwargs: object) -> None:
        if "synchronizing" in str(message):
            frames = [f for f in traceback.extract_stack() if "/mtlopt/" in f.filename]
            where = [f"{f.filename.split('/mtlopt/')[-1]}:{f.lineno}" for f in frames[::-1]]
            found[" < ".join(where[:3])] += 1

    for last, opt, losses, z in step_model(name, features):
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            if last:
                warnings.showwarning = record
                torch.cuda.set_sync_debug_mode("warn")
            try:
                opt.step(losses, features=z) if features else opt.step(losses)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    return found


def syncs_in_one_step(name: str, features: bool) -> int:
    return sum(sync_sites(name, features).values())


@pytest.mark.parametrize("name", sorted(set(FACTORIES) - {"MoDo", "SDMGrad"}))
def test_a_step_synchronises_only_to_decide_on_finiteness(name: str) -> None:
    counts = [syncs_in_one_step(name, features=False)]
    if representation_ok(name):
        counts.append(syncs_in_one_step(name, features=True))
    print(f"syncs per step {name}: {counts}")
    assert counts[0] <= sync_limit(name, False), counts
    assert counts[-1] <= sync_limit(name, len(counts) > 1), counts


def test_chunked_and_sequential_jacobians_match_the_batched_one() -> None:
    def run(**options):
        torch.manual_seed(0)
        net = Net().cuda().double()
        inner = torch.optim.SGD(net.parameters(), lr=0.05)
        opt = MultiTaskOptimizer(inner, weighting=FACTORIES["UPGrad"](), **options)
        x, y = (t.cuda().double() for t in make_batch(0))
        opt.step(net.losses(x, y))
        return [p.detach().cpu() for p in net.parameters()]

    batched = run()
    for options in ({"chunk_size": 1}, {"chunk_size": 2}, {"jacobian": "loop"}):
        for a, b in zip(run(**options), batched):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_grad_scaler_skips_an_overflow_without_touching_the_weighting() -> None:
    torch.manual_seed(0)
    net = Net().cuda()
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.05), weighting="GradVac")
    scaler = torch.amp.GradScaler("cuda")
    x, y = (t.cuda() for t in make_batch(0))
    with torch.autocast("cuda", dtype=torch.float16):
        losses = net.losses(x, y)
    opt.backward(losses, scaler=scaler)
    scaler.step(opt)
    scaler.update()
    state = {
        k: v.clone() if torch.is_tensor(v) else v
        for k, v in opt.weightings()[0].state_dict().items()
    }
    before = [p.detach().clone() for p in net.parameters()]
    scale = scaler.get_scale()
    with torch.autocast("cuda", dtype=torch.float16):
        losses = net.losses(x, y)
    losses[1] = losses[1] * float("inf")
    opt.zero_grad()
    assert opt.backward(losses, scaler=scaler) is False
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < scale
    for a, b in zip(before, net.parameters()):
        assert torch.equal(a, b)
    after = opt.weightings()[0].state_dict()
    for key, value in state.items():
        assert torch.equal(value, after[key]) if torch.is_tensor(value) else value == after[key]
