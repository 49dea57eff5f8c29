"""Gramian weightings on a CPU copy of the Gramian, as on a GPU (``mtlopt.host_solve``).

CI has no GPU: ``host_solve.off_host`` is patched so that the CPU's own tensors take the
path (the copy, the weighting on the copy, the upload of its weights). The step must be
the one the weighting gives on the Gramian itself, bit for bit; tests/test_cuda.py checks
the same on a GPU against the CPU in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from mtlopt import MultiTaskOptimizer, finiteness, host_solve, nosync
from mtlopt.finiteness import all_finite, all_finite_reading

from .conftest import Net, make_batch
from .method_kit import FACTORIES, trained_parameters

HOSTED = sorted(name for name, make in FACTORIES.items() if make().solves_on_host)


def train(name: str, features: bool) -> list[torch.Tensor]:
    return trained_parameters(name, "cpu", torch.float64, features)


def test_the_hosted_methods_are_the_gramian_solvers() -> None:
    assert {"UPGrad", "MGDA", "CAGrad", "NashMTL", "GradVac", "IMTLG"} <= set(HOSTED)
    assert not {"GradNorm", "MoDo", "SDMGrad"} & set(HOSTED)  # learnable or several batches


@pytest.mark.parametrize("features", [False, True])
@pytest.mark.parametrize("name", HOSTED)
def test_a_step_on_the_host_copy_is_the_step_on_the_gramian(name, features, monkeypatch) -> None:
    reference = train(name, features)
    copies = []
    real_copies, real_reading = nosync.host_copies, all_finite_reading

    def spy_reading(tensors, read):
        copies.extend(read)
        return real_reading(tensors, read)

    monkeypatch.setattr(host_solve, "off_host", lambda tensor: True)
    monkeypatch.setattr("mtlopt.gradients.all_finite_reading", spy_reading)
    monkeypatch.setattr(
        "mtlopt.features_single_pass.host_copies", lambda g: copies.extend(g) or real_copies(g)
    )
    hosted = train(name, features)
    assert copies, "the host path was not taken"
    for a, b in zip(hosted, reference):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [None, math.nan, math.inf])
def test_all_finite_reading_returns_the_flag_and_exact_copies(bad) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, 5, generator=g), torch.randn(7, generator=g, dtype=torch.float64)]
    if bad is not None:
        tensors[0][1, 2] = bad
    read = [torch.randn(4, 4, generator=g, dtype=torch.float64), torch.randn(2, 2, generator=g)]
    finite, copies = all_finite_reading(tensors, read)
    assert finite == all_finite(tensors) == (bad is None)
    for copy, original in zip(copies, read):
        assert copy.dtype == original.dtype and torch.equal(copy, original)
        assert copy.data_ptr() != original.data_ptr()  # a copy, not a view
    assert all_finite_reading([], read)[0] is True
    assert all_finite_reading(tensors, []) == (bad is None, [])


@pytest.mark.parametrize("features", [False, True])
@pytest.mark.parametrize("name", HOSTED)
def test_one_read_brings_every_gramian(name, features, monkeypatch) -> None:
    """Per step: one read for the finiteness decision with the Gramians, and in
    representation mode one more for z's Gramians (every group's, IMTL's two scaled ones
    too) before the final check, whatever the number of groups."""
    reads: list[str] = []
    real_copies, real_flag = nosync.host_copies, finiteness._found_non_finite
    monkeypatch.setattr(host_solve, "off_host", lambda tensor: True)
    for module in ("mtlopt.finiteness", "mtlopt.features_single_pass"):
        monkeypatch.setattr(
            f"{module}.host_copies", lambda t: reads.append("copy") or real_copies(t)
        )
    monkeypatch.setattr(
        finiteness, "_found_non_finite", lambda *a: reads.append("flag") or real_flag(*a)
    )
    torch.manual_seed(0)
    net = Net().double()
    groups = [{"params": net.encoder.parameters()}, {"params": net.heads.parameters()}]
    opt = MultiTaskOptimizer(torch.optim.SGD(groups, lr=0.05), FACTORIES[name]())
    x, y = (t.double() for t in make_batch(0))
    z = net.encoder(x)
    losses = [((h(z).squeeze(-1) - y[:, t]) ** 2).mean() for t, h in enumerate(net.heads)]
    opt.step(losses, features=z) if features else opt.step(losses)
    assert reads == (["copy", "flag"] if features else ["copy"]), reads


@pytest.mark.parametrize("features", [False, True])
@pytest.mark.parametrize(("encoder", "heads"), [("UPGrad", "IMTL"), ("IMTLG", "MGDA")])
def test_groups_with_their_own_weightings_get_their_own_copies(
    encoder, heads, features, monkeypatch
) -> None:
    """Two groups whose Gramians differ (IMTL scales its group's; MGDA reads the losses):
    each weighting must get its own group's copy."""

    def run() -> list[torch.Tensor]:
        torch.manual_seed(1)
        net = Net().double()
        groups = [
            {"params": net.encoder.parameters(), "weighting": FACTORIES[encoder]()},
            {"params": net.heads.parameters(), "weighting": FACTORIES[heads]()},
        ]
        opt = MultiTaskOptimizer(torch.optim.SGD(groups, lr=0.05, momentum=0.9))
        for seed in range(3):
            x, y = (t.double() for t in make_batch(seed))
            z = net.encoder(x)
            outs = [h(z).squeeze(-1) for h in net.heads]
            losses = [((o - y[:, t]) ** 2).mean() + 0.1 * t for t, o in enumerate(outs)]
            opt.step(losses, features=z) if features else opt.step(losses)
        return [p.detach().clone() for p in net.parameters()]

    reference = run()
    monkeypatch.setattr(host_solve, "off_host", lambda tensor: True)
    for a, b in zip(run(), reference):
        assert torch.equal(a, b)


def test_a_subclass_that_writes_its_own_weights_does_not_inherit_the_host_path() -> None:
    from mtlopt.weighting import UPGrad

    class Inherits(UPGrad, register=False):
        pass

    class Overrides(UPGrad, register=False):
        def weights_from_gramian(self, gramian, losses):
            return super().weights_from_gramian(gramian, losses)

    class Declares(Overrides, register=False):
        solves_on_host = True

    assert Inherits.solves_on_host and not Overrides.solves_on_host and Declares.solves_on_host
