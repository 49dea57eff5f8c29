"""GradVac's host sweeps (CPU, few tasks) against its vectorised loop, step after step."""

from __future__ import annotations

import pytest
import torch

import mtlopt.weighting.gradvac as gradvac_module
from mtlopt.weighting import GradVac


def gramians(m: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(m)
    jacobian = torch.randn(m, 7, generator=g, dtype=torch.float64)
    cases = {"random": jacobian}
    if m >= 2:
        cases["zero row"] = torch.cat([jacobian[:-1], torch.zeros(1, 7, dtype=torch.float64)])
        cases["duplicate"] = torch.cat([jacobian[:-1], jacobian[:1]])
        cases["opposite"] = torch.cat([jacobian[:-1], -jacobian[:1]])
        cases["rank one"] = torch.randn(m, 1, generator=g, dtype=torch.float64) * jacobian[:1]
        cases["scales"] = jacobian * torch.logspace(-3, 3, m, dtype=torch.float64)[:, None]
    return {name: j @ j.T for name, j in cases.items()}


#: Exactly parallel or opposite gradients: every cosine is +-1 in exact arithmetic, so the
#: measured cosines (and the targets learnt from them) are rounding noise in either loop.
ILL_POSED = {"rank one", "opposite"}


@pytest.mark.parametrize("beta", [0.0, 0.01, 0.5])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 10, 16, 32])
def test_host_sweeps_match_the_vectorised_loop(m: int, beta: float, monkeypatch) -> None:
    for name, gramian in gramians(m).items():
        host, vectorised = GradVac(beta=beta, seed=3), GradVac(beta=beta, seed=3)
        losses = torch.ones(m, dtype=torch.float64)
        for step in range(6):
            monkeypatch.setattr(gradvac_module, "HOST_MAX_TASKS", 64)
            got = host.weights_from_gramian(gramian * (1 + step), losses)
            monkeypatch.setattr(gradvac_module, "HOST_MAX_TASKS", 0)
            want = vectorised.weights_from_gramian(gramian * (1 + step), losses)
            if name in ILL_POSED:
                assert torch.isfinite(got).all() and host.phi_hat.abs().max() <= 1.0
                continue
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=name)
            torch.testing.assert_close(host.phi_hat, vectorised.phi_hat, rtol=1e-9, atol=1e-12)
        assert torch.equal(host.state_dict()["rng_state"], vectorised.state_dict()["rng_state"])


def test_host_sweeps_serve_the_cpu_up_to_the_limit(monkeypatch) -> None:
    calls = []
    original = gradvac_module.gradvac_sweeps
    monkeypatch.setattr(
        gradvac_module, "gradvac_sweeps", lambda *a: calls.append(len(a[0])) or original(*a)
    )
    for m in (2, gradvac_module.HOST_MAX_TASKS, gradvac_module.HOST_MAX_TASKS + 1):
        gramian = torch.eye(m, dtype=torch.float64)
        GradVac(seed=0).weights_from_gramian(gramian, torch.ones(m, dtype=torch.float64))
    assert calls == [2, gradvac_module.HOST_MAX_TASKS]
