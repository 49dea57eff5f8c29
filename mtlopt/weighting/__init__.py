"""Weighting strategies: how the per-task gradients of one param group become its update.

Each weighting declares what it needs (``needs``): the loss values only (one ordinary
backward pass), the group's Gramian ``J J^T``, or the per-task gradients themselves.
Anywhere a weighting is accepted, its name works too (``"gradvac"``, ``"IMTL-G"``).
"""

from __future__ import annotations

import inspect

from .adatask import AdaTask
from .aligned_mtl import AlignedMTL
from .base import REGISTRY, Weighting
from .baselines import Mean, Sum
from .cagrad import CAGrad, IMGrad
from .config import ConFIG
from .conicgrad import ConicGrad
from .dbmtl import DBMTL
from .double_sampling import MoDo, SDMGrad
from .dualproj import DualProj
from .excess_mtl import ExcessMTL
from .fairgrad import FairGrad
from .famo import FAMO
from .graddrop import GradDrop
from .gradnorm import GradNorm
from .gradvac import GradVac
from .imtl import IMTL, IMTLG, IMTLL
from .loss_balancing import DWA, GLS, STCH, Constant, Random
from .mgda import MGDA
from .moco import MoCo
from .nash_mtl import NashMTL
from .pcgrad import PCGrad
from .robust import Krum, TrimmedMean
from .uncertainty import UW
from .upgrad import UPGrad

#: Other names users know the methods by (LibMTL's and the papers').
ALIASES = {"ew": "Mean", "equal": "Mean", "rlw": "Random", "uncertainty": "UW", "dbmtl": "DBMTL"}


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def weighting_class(name: str) -> type[Weighting]:
    """The weighting class called ``name`` (case, ``-`` and ``_`` ignored)."""
    if not isinstance(name, str):
        raise TypeError(f"weighting: expected a name (str), got {type(name).__name__}")
    by_key = {_key(cls_name): cls for cls_name, cls in REGISTRY.items()}
    key = _key(name)
    try:
        return by_key[_key(ALIASES.get(key, key))]
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
    """Every weighting by name, with what it needs (losses, Gramian, per-task gradients),
    whether it is stateful, how many mini-batches a step reads, its constructor defaults
    and the first line of its docstring."""
    return {
        name: {
            "needs": cls.needs,
            "stateful": cls.stateful,
            "n_batches": cls.n_batches,
            "defaults": _defaults(cls),
            "summary": (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else "",
        }
        for name, cls in sorted(REGISTRY.items())
    }


def _defaults(cls: type[Weighting]) -> dict[str, object]:
    parameters = inspect.signature(cls.__init__).parameters.values()
    return {
        p.name: (None if p.default is inspect.Parameter.empty else p.default)
        for p in parameters
        if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


__all__ = [
    "DBMTL",
    "DWA",
    "FAMO",
    "GLS",
    "IMTL",
    "IMTLG",
    "IMTLL",
    "MGDA",
    "STCH",
    "UW",
    "AdaTask",
    "CAGrad",
    "FairGrad",
    "IMGrad",
    "NashMTL",
    "PCGrad",
    "AlignedMTL",
    "ConFIG",
    "ConicGrad",
    "Constant",
    "DualProj",
    "ExcessMTL",
    "GradDrop",
    "GradNorm",
    "Krum",
    "GradVac",
    "Mean",
    "MoCo",
    "MoDo",
    "Random",
    "SDMGrad",
    "Sum",
    "TrimmedMean",
    "UPGrad",
    "Weighting",
    "available",
    "resolve",
    "weighting_class",
]
