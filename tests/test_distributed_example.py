"""The torchrun example: two gloo processes train to the same parameters and state."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch.distributed as dist

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "distributed.py"


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
@pytest.mark.parametrize("weighting", ["gradvac", "upgrad"])
def test_torchrun_example_keeps_ranks_identical(weighting: str) -> None:
    # --standalone: rendezvous on a free port, so a busy default port cannot fail the test.
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    command += [str(EXAMPLE), "--steps", "60", "--weighting", weighting]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    diverged = "diverged" in done.stdout + done.stderr
    if done.returncode != 0 and not diverged:
        # About one full test run in ten, a torchrun launch of two gloo processes on a busy
        # two-core machine fails (reproduced neither alone nor under load). Once more,
        # showing the first attempt's output; ranks that diverged are never retried.
        warnings.warn(
            "torchrun example failed once, retrying: " + done.stdout[-1500:] + done.stderr[-1500:],
            RuntimeWarning,
            stacklevel=1,
        )
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "identical on every rank: True" in done.stdout
    losses = re.findall(r"test loss\s+([\d.]+) ->\s+([\d.]+)", done.stdout)
    assert len(losses) == 3
    assert all(float(after) < float(before) for before, after in losses), losses
