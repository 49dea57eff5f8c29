"""Param groups for the GradVac paper's four granularities (Section 4.2).

Every param group of a :class:`~mtlopt.MultiTaskOptimizer` is one aggregation group with its
own weighting state, so *how* the parameters are grouped decides the granularity:

* :func:`together`    - the whole model as one group (the paper's ``whole_model``);
* :func:`per_network` - one group per given module, e.g. encoder and decoder (``enc_dec``);
* :func:`per_layer`   - one group per module that owns parameters (``all_layer``);
* :func:`per_tensor`  - one group per parameter tensor (``all_matrix``).

Each helper returns a list of param-group dicts, with a ``"name"`` for logging, to hand to
any torch optimizer. Extra keyword options (``lr=...``) are copied into every group; do not
pass a weighting instance this way (groups must not share one): the wrapper's default is
copied into each group instead.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def _group(name: str, params: list[nn.Parameter], options: dict[str, Any]) -> dict[str, Any]:
    if "weighting" in options:
        raise ValueError(
            "weighting: a shared weighting instance would share state between groups; pass "
            "it to MultiTaskOptimizer(weighting=...) so each group gets its own copy"
        )
    return {"params": params, "name": name, **options}


def _trainable(params: Any) -> list[nn.Parameter]:
    return [p for p in params if p.requires_grad]


def together(module: nn.Module, **options: Any) -> list[dict[str, Any]]:
    """One group with every trainable parameter of ``module``."""
    return [_group(type(module).__name__, _trainable(module.parameters()), options)]


def per_network(*modules: nn.Module, **options: Any) -> list[dict[str, Any]]:
    """One group per module given (e.g. ``per_network(model.encoder, model.decoder)``)."""
    if not modules:
        raise ValueError("modules: expected at least one module, got none")
    groups = [_group(type(m).__name__, _trainable(m.parameters()), options) for m in modules]
    return [g for g in groups if g["params"]]


def per_layer(module: nn.Module, **options: Any) -> list[dict[str, Any]]:
    """One group per submodule that directly owns trainable parameters, in module order."""
    groups = []
    for name, sub in module.named_modules():
        params = _trainable(sub.parameters(recurse=False))
        if params:
            groups.append(_group(name or type(module).__name__, params, options))
    return groups


def per_tensor(module: nn.Module, **options: Any) -> list[dict[str, Any]]:
    """One group per trainable parameter tensor of ``module``."""
    return [_group(name, [p], options) for name, p in module.named_parameters() if p.requires_grad]
