"""The weighting part of a checkpoint: plain tensors and Python scalars only.

``MultiTaskOptimizer.state_dict()`` is the base optimizer's state dict (minus the weighting
objects in its param groups) plus an ``"mtlopt"`` entry built here, so it loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from typing import Any

from .weighting.base import Weighting

FORMAT_VERSION = 1
#: Hyperparameters that do not have to match on load (the RNG state is restored instead).
_NOT_COMPARED = frozenset({"seed"})


def weighting_entry(weighting: Weighting) -> dict[str, Any]:
    return {
        "weighting": type(weighting).__name__,
        "hyperparameters": weighting.hyperparameters(),
        "state": weighting.state_dict(),
    }


def build(weightings: list[Weighting | None]) -> dict[str, Any]:
    """The ``"mtlopt"`` entry: one item per param group (None for internal groups)."""
    return {
        "version": FORMAT_VERSION,
        "groups": [None if w is None else weighting_entry(w) for w in weightings],
    }


def check(entry: object, weightings: list[Weighting | None]) -> list[dict[str, Any] | None]:
    """Raise ValueError naming what differs if the saved entry does not fit this optimizer."""
    if not isinstance(entry, dict):
        raise ValueError(
            "state_dict: no 'mtlopt' entry; this is not a MultiTaskOptimizer state_dict "
            "(a base optimizer's state_dict loads with opt.optimizer.load_state_dict)"
        )
    version = entry.get("version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"state_dict: checkpoint format version {version!r} is not supported; "
            f"this mtlopt reads version {FORMAT_VERSION}"
        )
    saved = [g for g in entry.get("groups", []) if g is not None]
    current = [w for w in weightings if w is not None]
    if len(saved) != len(current):
        raise ValueError(
            f"state_dict: the checkpoint has {len(saved)} aggregation group(s), "
            f"this optimizer has {len(current)}"
        )
    for index, (item, weighting) in enumerate(zip(saved, current)):
        name = type(weighting).__name__
        if item["weighting"] != name:
            raise ValueError(
                f"state_dict: group {index} was saved with weighting {item['weighting']}, "
                f"this optimizer uses {weighting!r}"
            )
        mine = {k: v for k, v in weighting.hyperparameters().items() if k not in _NOT_COMPARED}
        theirs = {k: v for k, v in item["hyperparameters"].items() if k not in _NOT_COMPARED}
        if mine != theirs:
            raise ValueError(
                f"state_dict: group {index} was saved with {name}{theirs}, "
                f"this optimizer uses {name}{mine}"
            )
        weighting.check_state_dict(item["state"])
        if weighting.n_tasks is not None and item["state"]["n_tasks"] not in (
            None,
            weighting.n_tasks,
        ):
            raise ValueError(
                f"state_dict: group {index} was saved for {item['state']['n_tasks']} tasks, "
                f"this optimizer's {name} has {weighting.n_tasks}"
            )
    return saved


def check_group_sizes(state_dict: dict[str, Any], param_groups: list[dict[str, Any]]) -> None:
    """Raise ValueError, before anything is loaded, if the base optimizer's part does not fit."""
    saved = state_dict.get("param_groups")
    if not isinstance(saved, list):
        raise ValueError("state_dict: expected a 'param_groups' list, got none")
    if len(saved) != len(param_groups):
        raise ValueError(
            f"state_dict: the checkpoint has {len(saved)} param group(s), this optimizer has "
            f"{len(param_groups)}"
        )
    for index, (item, group) in enumerate(zip(saved, param_groups)):
        if len(item.get("params", ())) != len(group["params"]):
            raise ValueError(
                f"state_dict: param group {index} holds {len(item.get('params', ()))} tensor(s) "
                f"in the checkpoint and {len(group['params'])} in this optimizer"
            )
