"""What the shared property tests need to know about every weighting.

``FACTORIES`` builds each registered weighting with test-friendly arguments; a test checks
that no registered class is missing here, so a new method cannot skip the property kit.
``direction`` computes a method's update of one shared tensor from an explicit Jacobian,
through the same hooks the optimizer calls.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mtlopt import MultiTaskOptimizer
from mtlopt.weighting import weighting_class
from mtlopt.weighting.base import Weighting

from .conftest import Net, make_batch


def _build(name: str, **kwargs: object) -> Callable[[], Weighting]:
    return lambda: weighting_class(name)(**kwargs)


FACTORIES: dict[str, Callable[[], Weighting]] = {
    name: _build(name)
    for name in [
        "AdaTask",
        "AlignedMTL",
        "CAGrad",
        "ConFIG",
        "ConicGrad",
        "DBMTL",
        "DualProj",
        "DWA",
        "ExcessMTL",
        "FAMO",
        "FairGrad",
        "GLS",
        "GradDrop",
        "GradNorm",
        "GradVac",
        "IMGrad",
        "IMTL",
        "IMTLG",
        "IMTLL",
        "MGDA",
        "MoCo",
        "MoDo",
        "Mean",
        "NashMTL",
        "PCGrad",
        "Random",
        "SDMGrad",
        "STCH",
        "Sum",
        "UPGrad",
        "UW",
    ]
}
FACTORIES["Constant"] = lambda: weighting_class("Constant")(weights=[1.0, 2.0, 0.5])
FACTORIES["Krum"] = lambda: weighting_class("Krum")(n_byzantine=1, n_selected=2)
FACTORIES["TrimmedMean"] = lambda: weighting_class("TrimmedMean")(trim_number=1)

#: Methods whose papers prove the update never conflicts with a task (J d >= 0), built as the
#: guarantee needs: torchjd's default ridge (reg_eps) on UPGrad and DualProj weakens it to
#: g_i.d >= -reg_eps trace(G) w_i (tested in their own file).
NON_CONFLICTING = {
    name: FACTORIES.get(name, _build(name))
    for name in ["MGDA", "NashMTL", "FairGrad", "ConFIG", "ConicGrad"]
}
NON_CONFLICTING["UPGrad"] = _build("UPGrad", reg_eps=0.0)
NON_CONFLICTING["DualProj"] = _build("DualProj", reg_eps=0.0)
#: Deterministic, order-free methods: permuting the tasks permutes nothing in the update.
ORDER_FREE = {
    "AlignedMTL",
    "CAGrad",
    "ConFIG",
    "DualProj",
    "FairGrad",
    "GLS",
    "IMGrad",
    "IMTL",
    "IMTLG",
    "IMTLL",
    "MGDA",
    "Mean",
    "NashMTL",
    "Sum",
    "UPGrad",
    "UW",
    "ConicGrad",
}
#: Methods whose task count is fixed by their hyperparameters.
FIXED_TASKS = {"Constant": 3}


def trained_parameters(
    name: str, device: str, dtype: torch.dtype, features: bool, steps: int = 3
) -> list[torch.Tensor]:
    """The parameters (CPU, float64) after ``steps`` SGD+momentum steps of the weighting
    ``name`` on :class:`Net` from a seeded start, encoder and heads as two param groups;
    ``features``: in representation mode."""
    torch.manual_seed(0)  # the same model, and the same seeds for the weightings' generators
    net = Net().to(device=device, dtype=dtype)
    groups = [{"params": net.encoder.parameters()}, {"params": net.heads.parameters()}]
    opt = MultiTaskOptimizer(torch.optim.SGD(groups, lr=0.05, momentum=0.9), FACTORIES[name]())
    for seed in range(steps):
        x, y = (t.to(device=device, dtype=dtype) for t in make_batch(seed))
        z = net.encoder(x)
        losses = [((h(z).squeeze(-1) - y[:, t]) ** 2).mean() for t, h in enumerate(net.heads)]
        opt.step(losses, features=z) if features else opt.step(losses)
    return [p.detach().to("cpu", torch.float64) for p in net.parameters()]


def direction(weighting: Weighting, jacobian: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """The update of one shared tensor with per-task gradients ``jacobian`` ([m, n])."""
    m = jacobian.shape[0]
    weighting.ensure_parameters(m)
    scale = weighting.loss_weights(losses)
    if weighting.needs == "losses":
        assert scale is not None
        return scale.to(jacobian.dtype) @ jacobian
    if scale is not None:
        jacobian = jacobian * scale.to(jacobian.dtype)[:, None]
    if weighting.n_batches > 1:
        gramian = (jacobian @ jacobian.T).to(torch.float64)
        b = weighting.n_batches
        cross = gramian.expand(b, b, m, m).clone()
        weights = weighting.weights_from_cross_gramians(cross, losses)
    elif weighting.needs == "gramian":
        weights = weighting.weights_from_gramian((jacobian @ jacobian.T).to(torch.float64), losses)
    else:
        weighting.check_layout([jacobian])
        updates, _ = weighting.update_from_jacobian([jacobian], losses, [(1 << m) - 1])
        return updates[0]
    return weights.to(jacobian.dtype) @ jacobian
