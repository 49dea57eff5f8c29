"""What the examples share: finding weightings by name, the command line, tables.

Weightings are looked up by class name in mtlopt's registry. A class registers itself when its
module is imported, and new methods land in ``mtlopt/weighting/`` before ``mtlopt.weighting``
exports them, so a name that is not registered yet makes every module of the package be
imported (once) before giving up: an example picks up a method as soon as its file exists,
and skips it with a note while it does not.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mtlopt.weighting import Weighting, weighting_class

DEFAULT_OUT = Path(__file__).resolve().parent / "figures"

_imported_all = False
_import_notes: list[str] = []


def _import_weighting_modules() -> list[str]:
    """Import every module of ``mtlopt.weighting`` once; a note per module that fails."""
    global _imported_all
    if not _imported_all:
        _imported_all = True
        import mtlopt.weighting as package

        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
            try:
                importlib.import_module(f"mtlopt.weighting.{info.name}")
            except Exception as error:  # noqa: BLE001 (a file someone is writing right now)
                _import_notes.append(f"mtlopt/weighting/{info.name}.py does not import: {error!r}")
    return _import_notes


def find_weighting(name: str) -> type[Weighting] | None:
    """The weighting class called ``name`` (case, '-' and '_' ignored), or None if absent."""
    try:
        return weighting_class(name)
    except ValueError:
        _import_weighting_modules()
    try:
        return weighting_class(name)
    except ValueError:
        return None


@dataclass
class MethodSpec:
    """One method of an example: a label for tables, a class name and its arguments."""

    label: str
    class_name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def factory(self) -> Callable[[], Weighting]:
        """A function building a fresh instance; raises LookupError with the reason if the
        method cannot be built in this checkout."""
        cls = find_weighting(self.class_name)
        if cls is None:
            raise LookupError(f"mtlopt.weighting has no {self.class_name} (yet)")
        try:
            cls(**self.kwargs)  # fail here, with the reason, rather than mid-run
        except (TypeError, ValueError) as error:
            raise LookupError(f"{self.class_name}(**{self.kwargs}) fails: {error}") from None
        return lambda: cls(**self.kwargs)


def available_methods(
    specs: Sequence[MethodSpec], wanted: Sequence[str] | None = None
) -> list[tuple[MethodSpec, Callable[[], Weighting]]]:
    """The methods of ``specs`` (those whose label is in ``wanted``, if given) that this
    checkout has, with their factories; prints a note for each one skipped."""
    chosen = []
    keys = None if wanted is None else {_key(w) for w in wanted}
    for spec in specs:
        if keys is not None and _key(spec.label) not in keys and _key(spec.class_name) not in keys:
            continue
        try:
            chosen.append((spec, spec.factory()))
        except LookupError as error:
            print(f"note: {spec.label} skipped: {error}")
    if keys is not None and not chosen:
        raise SystemExit(f"none of the methods {list(wanted or [])} is available")
    return chosen


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "").split("(")[0]


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"folder for figures (default {DEFAULT_OUT})"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--methods", nargs="+", default=None, help="run only these methods (labels or class names)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: these tensors are small, and more threads than free "
        "cores make torch many times slower)",
    )
    return parser


def use_matplotlib_backend() -> Any:
    """pyplot with a non-interactive backend (figures are only written to files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], aligns: str = "") -> str:
    """A plain-text table; ``aligns`` holds one of '<' or '>' per column (default '>')."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[k]) for row in cells) for k in range(len(headers))]
    aligns = aligns.ljust(len(headers), ">")
    lines = []
    for index, row in enumerate(cells):
        lines.append("  ".join(f"{c:{a}{w}}" for c, a, w in zip(row, aligns, widths)).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


class ThreadCount:
    """Set torch's intra-op thread count for a block, then restore it."""

    def __init__(self, threads: int | None) -> None:
        self.threads = threads
        self.before = torch.get_num_threads()

    def __enter__(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.before)
