"""The methods under test: mtlopt weightings found by name, and their torchjd 0.18 twins.

Other engineers add weightings while this harness runs against the tree, so every module
under ``mtlopt/weighting/`` is imported with importlib (a new file registers its classes even
before ``mtlopt.weighting`` exports it) and each requested name is looked up in the registry;
a name that is not registered, or a module that does not import, becomes a note, not a crash.

torchjd twins (optional, ``pip install -e ".[bench]"``): gradient methods map to an
``Aggregator`` used through ``mtl_backward`` + ``jac_to_grad``; loss-only methods map to a
``torchjd.scalarization`` scalarizer (torchjd 0.18 has no Jacobian path for them: a
scalarizer is a plain backward of the scalarised loss). Hyperparameters that both libraries
name alike are passed from the mtlopt instance, so both run the same method (e.g. GradVac's
``beta=0.01``, where torchjd's default is 0.5).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

DEFAULT_METHODS = (
    "Mean", "IMTLL", "UW", "GradVac", "IMTLG", "ExcessMTL", "UPGrad", "MGDA", "CAGrad", "NashMTL",
)  # fmt: skip

#: CAGrad's c where the mtlopt class does not say (the paper's NYUv2 value, LibMTL's default).
CAGRAD_C = 0.4


@dataclass
class Method:
    """One mtlopt weighting class and how to build its torchjd twin (None if it has none)."""

    name: str
    cls: type
    needs: str
    torchjd: Callable[[int], Any] | None = None  #: n_tasks -> aggregator or scalarizer
    torchjd_kind: str = ""  #: "aggregator" or "scalarizer"
    notes: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        """Whether the method reads per-task gradients (the Gramian or the Jacobian)."""
        return self.needs != "losses"

    def build(self) -> Any:
        """A fresh instance with the class's defaults (every contender gets its own)."""
        return self.cls()


def import_weighting_modules() -> list[str]:
    """Import every module of ``mtlopt.weighting``; return a note per module that fails."""
    import mtlopt.weighting as package

    notes = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        try:
            importlib.import_module(f"mtlopt.weighting.{info.name}")
        except Exception as error:  # noqa: BLE001 - a file someone is writing right now
            notes.append(f"mtlopt/weighting/{info.name}.py does not import ({error!r}): skipped")
    return notes


def resolve_methods(names: list[str]) -> tuple[list[Method], list[str]]:
    """The methods called ``names`` that are registered, and a note for each one skipped."""
    import mtlopt.weighting as weighting_package
    from mtlopt.weighting.base import REGISTRY

    notes = import_weighting_modules()
    methods: list[Method] = []
    for name in names:
        try:
            cls = weighting_package.weighting_class(name)
        except (ValueError, TypeError):
            notes.append(f"{name}: not registered in mtlopt.weighting.base.REGISTRY yet: skipped")
            continue
        assert cls.__name__ in REGISTRY
        if getattr(cls, "n_batches", 1) > 1:
            notes.append(f"{name}: reads {cls.n_batches} mini-batches per step: skipped")
            continue
        try:
            instance = cls()
        except Exception as error:  # noqa: BLE001 - noted
            notes.append(f"{name}: {cls.__name__}() with its defaults fails ({error!r}): skipped")
            continue
        method = Method(name=cls.__name__, cls=cls, needs=cls.needs)
        method.torchjd, method.torchjd_kind = torchjd_factory(cls.__name__, instance)
        methods.append(method)
    return methods, notes


def torchjd_available() -> str | None:
    """torchjd's version if torchjd is installed, else None."""
    try:
        import torchjd  # noqa: F401
    except ImportError:
        return None
    try:
        return importlib.metadata.version("torchjd")
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def _pick(instance: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """Hyperparameters of the mtlopt instance that the torchjd class takes too."""
    hyper = instance.hyperparameters() if hasattr(instance, "hyperparameters") else {}
    return {k: hyper[k] for k in names if hyper.get(k) is not None}


def torchjd_factory(name: str, instance: Any) -> tuple[Callable[[int], Any] | None, str]:
    """``n_tasks -> torchjd object`` for the method called ``name``, and its kind."""
    if torchjd_available() is None:
        return None, ""
    from torchjd import aggregation as agg
    from torchjd import scalarization as sc

    scalarizers: dict[str, Callable[[int], Any]] = {
        "Mean": lambda m: sc.Mean(),
        "Sum": lambda m: sc.Sum(),
        "UW": lambda m: sc.UW(m),
        "IMTLL": lambda m: sc.IMTLL(m),
        "GLS": lambda m: sc.GeometricMean(),
        "Random": lambda m: sc.Random(),
    }
    if name in scalarizers:
        return scalarizers[name], "scalarizer"
    aggregators: dict[str, Callable[[int], Any]] = {
        "GradVac": lambda m: agg.GradVac(**_pick(instance, ("beta", "eps"))),
        "IMTLG": lambda m: agg.IMTLG(),
        "ExcessMTL": lambda m: agg.ExcessMTL(
            **_pick(instance, ("robust_step_size", "n_warmup_steps"))
        ),
        "UPGrad": lambda m: agg.UPGrad(),
        "MGDA": lambda m: agg.MGDA(),
        "CAGrad": lambda m: agg.CAGrad(**{"c": CAGRAD_C, **_pick(instance, ("c",))}),
        "NashMTL": lambda m: agg.NashMTL(
            n_tasks=m, **_pick(instance, ("max_norm", "update_weights_every", "optim_niter"))
        ),
        "AlignedMTL": lambda m: agg.AlignedMTL(),
        "DualProj": lambda m: agg.DualProj(),
        "ConFIG": lambda m: agg.ConFIG(),
        "PCGrad": lambda m: agg.PCGrad(),
        "GradDrop": lambda m: agg.GradDrop(),
    }
    if name in aggregators:
        return aggregators[name], "aggregator"
    return None, ""
