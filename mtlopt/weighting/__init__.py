"""Weighting strategies: how the per-task gradients of one param group become its update.

Each weighting declares what it needs (``needs``): the loss values only (one ordinary
backward pass), the group's Gramian ``J J^T``, or the per-task gradients themselves.
Anywhere a weighting is accepted, its name works too (``"gradvac"``, ``"IMTL-G"``).
"""

from __future__ import annotations

from .base import REGISTRY, Weighting
from .baselines import Mean, Sum
from .excess_mtl import ExcessMTL
from .gradvac import GradVac
from .imtl import IMTL, IMTLG, IMTLL


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def weighting_class(name: str) -> type[Weighting]:
    """The weighting class called ``name`` (case, ``-`` and ``_`` ignored)."""
    if not isinstance(name, str):
        raise TypeError(f"weighting: expected a name (str), got {type(name).__name__}")
    by_key = {_key(cls_name): cls for cls_name, cls in REGISTRY.items()}
    try:
        return by_key[_key(name)]
    except KeyError:
        raise ValueError(
            f"weighting: unknown weighting {name!r}; known: {sorted(REGISTRY)}"
        ) from None


def resolve(weighting: Weighting | str | None, argument: str = "weighting") -> Weighting | None:
    """A weighting instance from an instance, a name (built with its defaults), or None."""
    if weighting is None or isinstance(weighting, Weighting):
        return weighting
    if isinstance(weighting, str):
        return weighting_class(weighting)()
    raise TypeError(
        f"{argument}: expected a mtlopt.weighting.Weighting or its name, "
        f"got {type(weighting).__name__}"
    )


def available() -> dict[str, dict[str, object]]:
    """Every weighting by name, with what it needs, whether it is stateful and how many
    mini-batches a step reads."""
    return {
        name: {
            "needs": cls.needs,
            "stateful": cls.stateful,
            "n_batches": cls.n_batches,
            "summary": (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else "",
        }
        for name, cls in sorted(REGISTRY.items())
    }


__all__ = [
    "ExcessMTL",
    "GradVac",
    "IMTL",
    "IMTLG",
    "IMTLL",
    "Mean",
    "Sum",
    "Weighting",
    "available",
    "resolve",
    "weighting_class",
]
