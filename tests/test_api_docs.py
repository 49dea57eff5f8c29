"""The API reference builds with pdoc, without a warning, and documents every public name."""

from __future__ import annotations

import importlib
import inspect
import re
import warnings
from pathlib import Path

import pytest

pdoc = pytest.importorskip("pdoc")

#: The documented modules (the README's docs command builds the same list).
MODULES = ["mtlopt", "mtlopt.weighting", "mtlopt.solvers", "mtlopt.aggregation", "mtlopt.grouping"]


FIGURES = Path(__file__).resolve().parent.parent / "examples" / "figures"


def test_reference_builds_without_warnings(tmp_path: Path) -> None:
    pdoc.render.configure(docformat="restructuredtext")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pdoc.pdoc(*MODULES, output_directory=tmp_path)
    pages = {module: tmp_path / (module.replace(".", "/") + ".html") for module in MODULES}
    for module, page in pages.items():
        assert page.is_file(), module
    # The package page shows the examples' figures (the docs command copies them beside it).
    shown = re.findall(r'<img src="([^"]+)"', pages["mtlopt"].read_text())
    assert len(shown) == 4, shown
    for source in shown:
        assert (FIGURES.parent.parent / source).is_file(), f"missing figure {source}"
    weighting = importlib.import_module("mtlopt.weighting")
    text = pages["mtlopt.weighting"].read_text()
    missing = [name for name in weighting.__all__ if f'id="{name}"' not in text]
    assert not missing, f"not in the reference: {missing}"
    assert 'id="MultiTaskOptimizer"' in pages["mtlopt"].read_text()


@pytest.mark.parametrize("module_name", MODULES)
def test_every_public_name_has_a_docstring(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert inspect.getdoc(module), module_name
    names = getattr(module, "__all__", [n for n in vars(module) if not n.startswith("_")])
    undocumented = []
    for name in names:
        member = getattr(module, name)
        if inspect.ismodule(member) or not (inspect.isclass(member) or callable(member)):
            continue
        if getattr(member, "__module__", "").split(".")[0] != "mtlopt":
            continue  # re-exported from torch or typing
        if not inspect.getdoc(member):
            undocumented.append(name)
        if inspect.isclass(member):
            for attribute, value in vars(member).items():
                public = not attribute.startswith("_") and callable(value)
                if public and not inspect.getdoc(getattr(member, attribute)):
                    undocumented.append(f"{name}.{attribute}")
    assert not undocumented, f"{module_name}: no docstring for {undocumented}"
