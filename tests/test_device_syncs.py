"""A step waits for the device only to decide whether it may move anything.

On a GPU every value read back to the host stalls the stream, so a step reads back twice:
whether the losses are finite (before the backward) and whether the gradients are (after
it); a loss-only step split over several param groups reads the groups' loss weights once
more (one backward serves the groups whose weights agree), and the eigendecompositions of
IMTL, IMTL-G, ConFIG and Aligned-MTL add torch's own check of their error codes where they
run on the device (the optimizer runs them on a CPU copy: ``mtlopt.host_solve``). CI has no
GPU, so :class:`tests.device_reads.DeviceReads` counts those calls on the CPU, with the
CPU's shortcuts off (the device code runs); ``tests/test_cuda.py`` counts the real
synchronisations where a GPU is present.
"""

from __future__ import annotations

import pytest
import torch

from mtlopt import MultiTaskOptimizer, host_solve
from mtlopt import features as features_module
from mtlopt.nosync import at
from mtlopt.solvers import host_linalg

from .conftest import Net, make_batch
from .device_reads import DeviceReads
from .method_kit import FACTORIES

#: Where a step may read back, and how often (per step).
ALLOWED = {
    "losses.py:check_finite_values": 1,
    "finiteness.py:_found_non_finite": 1,
    "loss_only.py:distinct_rows": 1,
}
#: torch.linalg.eigh checks its error codes on the host: once per group's weighting.
EIGH_SITES = {"solvers/linear.py:pinv_solve", "weighting/aligned_mtl.py:aligned_mtl_weights"}
#: Reads of tensors made on the CPU (a generator's draw), which never wait for a device.
HOST_BORN = {"weighting/graddrop.py:_step_generator"}
CASES = [
    (name, features)
    for name in sorted(FACTORIES)
    for features in (False, True)
    if FACTORIES[name]().n_batches == 1 and not (features and FACTORIES[name]().needs == "jacobian")
]


def reads_in_a_step(name: str, features: bool) -> dict[str, int]:
    """The read-back sites of the fourth step (the first three create every state)."""
    torch.manual_seed(0)
    net = Net()
    groups = [{"params": net.encoder.parameters()}, {"params": net.heads.parameters()}]
    opt = MultiTaskOptimizer(torch.optim.SGD(groups, lr=0.05), weighting=FACTORIES[name]())
    for seed in range(4):
        x, y = make_batch(seed)
        z = net.encoder(x)
        losses = [((h(z).squeeze(-1) - y[:, t]) ** 2).mean() for t, h in enumerate(net.heads)]
        counter = DeviceReads()
        with counter:
            opt.step(losses, features=z) if features else opt.step(losses)
    return dict(counter.sites)


@pytest.mark.filterwarnings("ignore:param_groups")
@pytest.mark.parametrize(("name", "features"), CASES)
def test_the_device_code_reads_back_only_to_decide(name, features, monkeypatch) -> None:
    monkeypatch.setattr(host_linalg, "HOST_READS", False)
    # The one-pass representation step weighs inside an autograd hook, where a
    # TorchFunctionMode does not reach: count the general path's reads (test_cuda.py
    # counts both paths' synchronisations on a GPU).
    monkeypatch.setattr(features_module, "single_pass_applies", lambda *a: False)
    sites = reads_in_a_step(name, features)
    for site, count in sites.items():
        if site in HOST_BORN:
            continue
        limit = 2 if site in EIGH_SITES else ALLOWED.get(site, 0)
        assert count <= limit, (site, count, sites)
    assert sites.get("losses.py:check_finite_values") == 1
    assert sites.get("finiteness.py:_found_non_finite") == 1


#: With the weightings on the host, their reads are of the CPU copies; so is the flag's.
HOST_COPY_READS = (
    "weighting/",
    "solvers/",
    "finiteness.py:all_finite_reading",
    "finiteness.py:few_finite",
)
HOSTED = [(name, features) for name, features in CASES if FACTORIES[name]().solves_on_host]


@pytest.mark.parametrize(("name", "features"), HOSTED)
def test_the_host_solve_path_reads_once_per_decision(name, features, monkeypatch) -> None:
    """As on a GPU: the Gramians come back with the finiteness flag (representation mode:
    in one read of all the groups' before the final check), the weightings reuse the
    optimizer's read of the loss values."""
    monkeypatch.setattr(host_linalg, "HOST_READS", False)  # the GPU's deferred checks
    monkeypatch.setattr(host_solve, "off_host", lambda tensor: True)
    monkeypatch.setattr(features_module, "single_pass_applies", lambda *a: False)
    sites = reads_in_a_step(name, features)
    device = {k: v for k, v in sites.items() if not k.startswith(HOST_COPY_READS)}
    expected = {"losses.py:check_finite_values": 1, "nosync.py:host_copies": 1}
    if features:
        expected["finiteness.py:_found_non_finite"] = 1
    assert device == expected, sites


def test_the_counter_sees_what_would_wait() -> None:
    """The counter must be able to fail: it sees a read, a 0-dim index and eigh."""
    values = torch.arange(4.0)
    counter = DeviceReads()
    with counter:
        values[values.argmax()]
        float(values.sum())
        torch.linalg.eigh(torch.eye(2))
        values[values > 1]
        torch.where(values > 1)
        values.cpu()
        at(values, values.argmax())  # stays on the device: not counted
        values.index_select(0, values.argmax().reshape(1))  # nor this
    assert sum(counter.sites.values()) == 6, counter.sites


def test_indexing_without_reading_back_matches_plain_indexing() -> None:
    rows = torch.randn(5, 3, dtype=torch.float64)
    for k in range(5):
        torch.testing.assert_close(at(rows, torch.tensor(k)), rows[k], rtol=0, atol=0)
