"""Weighting strategies: how the per-task gradients of one param group become its update.

Each weighting declares what it needs (``needs``): the loss values only (one ordinary
backward pass), the group's Gramian ``J J^T``, or the per-task gradients themselves.
"""

from __future__ import annotations

from .base import Weighting
from .baselines import Mean, Sum
from .excess_mtl import ExcessMTL
from .gradvac import GradVac
from .imtl import IMTL, IMTLG, IMTLL

_REGISTRY: dict[str, type[Weighting]] = {
    cls.__name__: cls for cls in (Mean, Sum, GradVac, ExcessMTL, IMTL, IMTLG, IMTLL)
}


def weighting_class(name: str) -> type[Weighting]:
    """The weighting class saved under ``name`` in a checkpoint."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"weighting: unknown weighting {name!r}; known: {sorted(_REGISTRY)}"
        ) from None


__all__ = ["ExcessMTL", "GradVac", "IMTL", "IMTLG", "IMTLL", "Mean", "Sum", "Weighting"]
