"""Smoke runs of the examples (``--quick``): each completes and writes its figure."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def examples_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # The examples import their shared modules (example_kit, multidigits) by plain name, as
    # they do when run as scripts from any folder.
    monkeypatch.syspath_prepend(str(EXAMPLES))


def _run(name: str, tmp_path: Path) -> dict:
    module = importlib.import_module(name)
    return module.main(["--quick", "--no-progress", "--out", str(tmp_path)])


def test_toy(examples_on_path: None, tmp_path: Path) -> None:
    result = _run("toy", tmp_path)
    for name in ("toy_parameter_space.png", "toy_loss_space.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "Mean" in result["summary"]
    # The batched replay is MultiTaskOptimizer's step: rounding-level differences at most.
    assert all(gap.max() < 1e-4 for gap in result["check_gaps"].values())


def test_multidigits(examples_on_path: None, tmp_path: Path) -> None:
    result = _run("multidigits", tmp_path)
    assert (tmp_path / "multidigits.png").stat().st_size > 0
    assert result["table"]["Mean"]["delta_m"] == [0.0]


def test_grouping(examples_on_path: None, tmp_path: Path) -> None:
    result = _run("grouping", tmp_path)
    assert (tmp_path / "grouping.png").stat().st_size > 0
    assert len(result["table"]) == 5


def test_pareto_set_matches_the_papers_value(examples_on_path: None) -> None:
    toy = importlib.import_module("toy")
    curve = toy.pareto_set(1401)
    assert curve[700, 0] == pytest.approx(0.0)
    assert curve[700, 1] == pytest.approx(-8.3551, abs=1e-4)  # the mean's minimum, unscaled
    assert curve[0, 1] == pytest.approx(curve[-1, 1])
    assert toy.distance_to_set(curve[::100] + [0.0, 0.5], curve) == pytest.approx(0.5, abs=1e-3)


def test_missing_methods_are_skipped_with_a_note(
    examples_on_path: None, capsys: pytest.CaptureFixture[str]
) -> None:
    kit = importlib.import_module("example_kit")
    specs = [
        kit.MethodSpec("Mean", "Mean"),
        kit.MethodSpec("Nope", "NoSuchWeighting"),
        kit.MethodSpec("GradVac(bad)", "GradVac", {"no_such_argument": 1}),
    ]
    chosen = kit.available_methods(specs)
    assert [spec.label for spec, _ in chosen] == ["Mean"]
    out = capsys.readouterr().out
    assert "Nope skipped" in out and "GradVac(bad) skipped" in out
