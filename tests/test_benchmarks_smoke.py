"""Smoke test of the benchmark harness (benchmarks/step_time.py): its smallest configuration
runs in-process and yields a timing row for every contender and a markdown table.

No timing assertions: the figures depend on the machine and its load.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from benchmarks.measure import WeightingInput, mtlopt_weighting_call
from benchmarks.methods import DEFAULT_METHODS
from benchmarks.step_time import main
from mtlopt import host_solve
from mtlopt.weighting import UPGrad


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("bench") / "results.md"
    threads = torch.get_num_threads()
    state = torch.random.get_rng_state()
    result = main(
        ["--quick", "--workloads", "mlp", "--tasks", "2", "--threads", "1",
         "--weighting-tasks", "2", "--repeats", "1", "--warmup", "1", "--out", str(out)]
    )  # fmt: skip
    # The harness leaves the process as it found it (pytest runs other tests after it).
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), state)
    return result, out


def test_every_contender_has_a_row(run) -> None:
    result, _ = run
    (config,) = result.configs
    assert config.workload == "mlp" and config.n_tasks == 2
    samples = config.timing.samples
    expected = [("", "plain"), ("", "floor"), ("", "floor-z")]
    for method in result.methods:
        expected.append((method.name, "mtlopt"))
        if method.exact:
            expected.append((method.name, "loop"))
        if method.torchjd is not None:
            expected.append((method.name, "torchjd"))
    ours = [key for key in expected if key[1] != "torchjd"]
    # mtlopt, the loop and the floors must run; a torchjd failure is torchjd's (noted).
    assert not [k for k in config.timing.failures if k[1] != "torchjd"], config.timing.failures
    for key in expected:
        if key in config.timing.failures:
            assert any(key[0] in note for note in result.notes)
            continue
        values = samples.get(key)
        assert values and all(math.isfinite(v) and v > 0 for v in values), key
        assert config.memory.get(key) is not None, key
    assert all(key in samples for key in ours)
    # The registered default methods are all present (others are skipped with a note).
    names = {m.name for m in result.methods}
    assert {"Mean", "IMTLL", "GradVac", "IMTLG", "ExcessMTL"} <= names
    for name in DEFAULT_METHODS:
        if name not in names:
            assert any(note.startswith(name) for note in result.notes), name


def test_markdown_table_and_outputs(run) -> None:
    result, out = run
    text = out.read_text()
    assert text.strip() == result.markdown.strip()
    assert "| method | needs | mtlopt ms |" in text
    assert "## Targets of issue 4" in text
    for method in result.methods:
        assert f"| {method.name} | {method.needs} |" in text
    assert any(t.method == "GradVac" and t.mtlopt_ms > 0 for t in result.weighting_times)
    png = Path(out).with_suffix(".png")
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.exists() and png.stat().st_size > 0
    else:
        assert not png.exists()


@pytest.mark.parametrize("name", ["IMTLG", "GradVac"])
def test_contenders_run_the_same_method(name: str) -> None:
    """The loop and torchjd contenders apply the same update as mtlopt (first step, m = 3):
    the comparison is between implementations of one method, not between methods."""
    from benchmarks import contenders
    from benchmarks.methods import resolve_methods
    from benchmarks.workloads import WORKLOADS

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        (method,), _ = resolve_methods([name])
        workload = WORKLOADS["mlp"]
        template = workload.build(3)
        x, y = workload.batch(3, torch.device("cpu"))
        runs = [contenders.mtlopt(template, x, y, method), contenders.loop(template, x, y, method)]
        if method.torchjd is not None:
            runs.append(contenders.torchjd(template, x, y, method))
        for run in runs:
            run.step()
    before = torch.cat([p.detach().flatten() for p in template.parameters()])
    moved = [torch.cat([p.detach().flatten() for p in r.model.parameters()]) - before for r in runs]
    scale = moved[0].abs().max()
    assert scale > 0
    for other in moved[1:]:
        assert (other - moved[0]).abs().max() <= 1e-3 * scale


def test_round_robin_bursts_take_cheap_steps_several_times_a_round() -> None:
    from benchmarks.contenders import Contender
    from benchmarks.measure import round_robin

    now = [0.0]
    calls = {"cheap": 0, "dear": 0}

    def stepper(name: str, seconds: float):
        def step() -> None:
            calls[name] += 1
            now[0] += seconds

        return step

    cheap = Contender("cheap", "", stepper("cheap", 0.004), None)
    dear = Contender("dear", "", stepper("dear", 0.05), None)
    timing = round_robin(
        [cheap, dear], torch.device("cpu"), warmup=1, repeats=3, min_repeats=3,
        budget_s=1e9, clock=lambda: now[0], burst_s=0.02, max_burst=8,
    )  # fmt: skip
    # Warm-up: a 20 ms burst each; then per round 5 cheap steps (5 x 4 ms fit in 20 ms), 1 dear.
    assert calls == {"cheap": 5 + 3 * 5, "dear": 1 + 3}
    assert len(timing.samples[cheap.key]) == 15
    assert timing.samples[dear.key] == pytest.approx([0.05] * 3)
    assert timing.rounds == 3

    calls.update(cheap=0, dear=0)
    capped = round_robin(
        [cheap], torch.device("cpu"), warmup=0, repeats=2, min_repeats=2,
        budget_s=1e9, clock=lambda: now[0], burst_s=10.0, max_burst=8,
    )  # fmt: skip
    assert calls["cheap"] == 16 and len(capped.samples[cheap.key]) == 16


def test_round_robin_gives_comparable_contenders_the_references_burst() -> None:
    """A contender 12% slower than the reference takes as many steps per burst (the same
    positions), where a count set by time would give it one fewer; a dear one keeps its own."""
    from benchmarks.contenders import Contender
    from benchmarks.measure import burst_counts, round_robin

    now = [0.0]
    calls = {"plain": 0, "near": 0, "dear": 0}

    def stepper(name: str, seconds: float):
        def step() -> None:
            calls[name] += 1
            now[0] += seconds

        return step

    times = {"plain": 0.004, "near": 0.0045, "dear": 0.013}
    runs = [Contender(name, "", stepper(name, s), None) for name, s in times.items()]
    timing = round_robin(
        runs, torch.device("cpu"), warmup=1, repeats=2, min_repeats=2, budget_s=1e9,
        clock=lambda: now[0], burst_s=0.02, max_burst=8, reference=("", "plain"),
    )  # fmt: skip
    assert [len(timing.samples[r.key]) for r in runs] == [2 * 5, 2 * 5, 2 * 1]
    # Without a reference each count is set by its own time: 20 ms / 4.5 ms -> 4 steps.
    warm = {("", name): [seconds] * 3 for name, seconds in times.items()}
    assert burst_counts(warm, 0.02, 8, None) == {("", "plain"): 5, ("", "near"): 4, ("", "dear"): 1}
    warm[("", "within")] = [0.011] * 3  # under 3 x 4 ms: the reference's count, 5 x 11 ms
    assert burst_counts(warm, 0.02, 8, ("", "plain"))[("", "within")] == 5
    assert burst_counts(warm, 0.0, 8, ("", "plain")) == {key: 1 for key in warm}


def test_allocator_script_runs_both_settings() -> None:
    pytest.importorskip("resource")  # page-fault counts: Unix only
    from benchmarks.allocator import STEPS, main

    results = main(["--tasks", "2", "--steps", "2", "--threads", "1"])
    assert set(results) == {"glibc default", "tuned"}
    for measured in results.values():
        assert set(measured) == set(STEPS)
        assert all(ms > 0 and faults >= 0 for ms, faults in measured.values())


def test_weighting_only_time_takes_the_optimizers_path_off_the_cpu(monkeypatch) -> None:
    """On a GPU the harness times what a step runs: the Gramian's copy, the weighting on
    the CPU, the upload (patched here so that the CPU's tensors take that path)."""
    data = WeightingInput.from_mlp(3, torch.device("cpu"))
    direct, label = mtlopt_weighting_call(UPGrad(), data)
    assert label == "weights_from_gramian(G)"
    monkeypatch.setattr(host_solve, "off_host", lambda tensor: True)
    hosted, label = mtlopt_weighting_call(UPGrad(), data)
    assert label == "weights_from_gramian(G.cpu()), uploaded"
    assert torch.equal(hosted(), direct())
