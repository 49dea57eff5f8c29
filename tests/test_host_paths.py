"""The CPU's shortcuts against the device code, both run on the CPU.

On the CPU the weightings read values back to the host (free there) and solve small
problems on Python floats (``mtlopt.solvers.host_linalg``); on other devices they run
synchronisation-free tensor code. CI has no GPU, so the device code is run here on the CPU
(``host_linalg.HOST_READS = False``) and both must give the same update.
"""

from __future__ import annotations

import pytest
import torch

import mtlopt.weighting as W
from mtlopt.solvers import host_linalg

WEIGHTINGS = {
    "UPGrad": W.UPGrad,
    "DualProj": W.DualProj,
    "NashMTL": W.NashMTL,
    "FairGrad": lambda: W.FairGrad(alpha=2.0),
    "CAGrad": W.CAGrad,
    "IMGrad": W.IMGrad,
    "MGDA": W.MGDA,
    "IMTLG": W.IMTLG,
}


def gramian_of(seed: int, m: int, kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.randn(m, 1, generator=g, dtype=torch.float64))
    jacobian = torch.randn(m, m + 7, generator=g, dtype=torch.float64) * scales
    if kind == "shared":  # tasks that mostly agree
        jacobian += 2.0 * torch.randn(1, m + 7, generator=g, dtype=torch.float64)
    elif kind == "zero":
        jacobian[0] = 0.0
    return jacobian @ jacobian.T


@pytest.mark.parametrize("name", list(WEIGHTINGS))
@pytest.mark.parametrize("m", [2, 5, 10, 16, 20])
@pytest.mark.parametrize("kind", ["random", "shared", "zero"])
def test_cpu_shortcuts_match_the_device_code(name, m, kind, monkeypatch) -> None:
    losses = torch.ones(m, dtype=torch.float64)
    for seed in range(3):
        gramian = gramian_of(100 * m + seed, m, kind)
        shortcut = WEIGHTINGS[name]()
        device_code = WEIGHTINGS[name]()
        for _ in range(2):  # twice: the second solve warm-starts where a method does
            fast = shortcut.weights_from_gramian(gramian, losses)
            with monkeypatch.context() as patch:
                patch.setattr(host_linalg, "HOST_READS", False)
                reference = device_code.weights_from_gramian(gramian, losses)
            # The updates J^T w must agree (the weights themselves are not unique where the
            # gradients are dependent): ||J^T (w - w_ref)|| from the Gramian.
            difference = fast - reference
            error = (difference @ gramian @ difference).clamp(min=0).sqrt()
            size = (reference @ gramian @ reference).clamp(min=0).sqrt()
            assert error <= 1e-6 * (size + gramian.diagonal().max().sqrt()), (fast, reference)


def test_imtl_g_host_solve_needs_its_certificate(monkeypatch) -> None:
    """IMTL-G's host path answers only where the conditioning bound proves the
    pseudo-inverse is the inverse: nearly dependent gradients go to the tensor path (whose
    eigenvalue cut-off then matters), and both paths agree where the host answers."""
    from mtlopt.weighting import imtl_host

    answers = []
    host = imtl_host.imtl_g_on_host
    monkeypatch.setattr(
        "mtlopt.weighting.imtl.imtl_g_on_host", lambda *a: answers.append(host(*a)) or answers[-1]
    )
    g = torch.Generator().manual_seed(3)
    independent = torch.randn(6, 20, generator=g, dtype=torch.float64)
    dependent = independent.clone()
    dependent[5] = dependent[4] + 1e-9 * dependent[0]  # K has an eigenvalue near 1e-18
    losses = torch.ones(6, dtype=torch.float64)
    for jacobian, answered in [(independent, True), (dependent, False)]:
        answers.clear()
        gramian = jacobian @ jacobian.T
        weights = W.IMTLG().weights_from_gramian(gramian, losses)
        assert (answers[0] is not None) == answered
        monkeypatch.setattr(host_linalg, "HOST_READS", False)
        reference = W.IMTLG().weights_from_gramian(gramian, losses)
        monkeypatch.setattr(host_linalg, "HOST_READS", True)
        torch.testing.assert_close(weights, reference, rtol=1e-9, atol=1e-12)


def test_cagrad_host_chain_equals_the_tensor_chain(monkeypatch) -> None:
    """CAGrad on Python floats (up to 16 tasks) is the CPU's tensor chain step for step:
    the same weights to 1e-12 where it answers, the tensor chain's where it declines."""
    from mtlopt.weighting import cagrad as cagrad_module

    answers = []
    host = cagrad_module.cagrad_weights_on_host
    monkeypatch.setattr(
        cagrad_module, "cagrad_weights_on_host", lambda *a: answers.append(host(*a)) or answers[-1]
    )
    for seed in range(12):
        m = 2 + seed
        gramian = gramian_of(300 + seed, m, "shared" if seed % 3 == 0 else "random")
        losses = torch.ones(m, dtype=torch.float64)
        for c in (0.4, 0.9):
            answers.clear()
            fast = W.CAGrad(c=c).weights_from_gramian(gramian, losses)
            monkeypatch.setattr(host_linalg, "HOST_MAX_TASKS", 0)
            tensor = W.CAGrad(c=c).weights_from_gramian(gramian, losses)
            monkeypatch.setattr(host_linalg, "HOST_MAX_TASKS", 16)
            torch.testing.assert_close(fast, tensor, rtol=0, atol=1e-12)
        if m <= 11:
            assert answers[-1] is not None, f"the host chain should answer at m = {m}"
