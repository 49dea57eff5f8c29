"""Where a CUDA step synchronises with the host: per method, the source lines of every
synchronising call in one warmed step (``torch.cuda.set_sync_debug_mode("warn")``).

    python -m benchmarks.sync_sites [NAME ...]      # on a machine with a CUDA device
"""

from __future__ import annotations

import collections
import sys
import traceback
import warnings

import torch

from tests.method_kit import FACTORIES
from tests.test_cuda import representation_ok, step_model


def sites(name: str, features: bool) -> collections.Counter:
    """The mtlopt source lines (innermost three frames) of each synchronisation."""
    found: collections.Counter = collections.Counter()

    def record(message: Warning | str, *args: object, **kwargs: object) -> None:
        if "synchronizing" in str(message):
            frames = [f for f in traceback.extract_stack() if "/mtlopt/" in f.filename]
            found[" < ".join(f"{_short(f.filename)}:{f.lineno}" for f in frames[::-1][:3])] += 1

    for last, opt, losses, z in step_model(name, features):
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            if last:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                opt.step(losses, features=z) if features else opt.step(losses)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    return found


def _short(path: str) -> str:
    return path.split("/mtlopt/")[-1]


def main() -> None:
    names = sys.argv[1:] or sorted(set(FACTORIES) - {"MoDo", "SDMGrad"})
    for name in names:
        for features in (False, True) if representation_ok(name) else (False,):
            found = sites(name, features)
            where = "\n    ".join(f"{k} x{v}" for k, v in found.most_common())
            print(f"{name}{' (features)' if features else ''}: {sum(found.values())}:\n    {where}")


if __name__ == "__main__":
    main()
