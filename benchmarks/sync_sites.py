"""Where a CUDA step synchronises with the host: per method, the source lines of every
synchronising call in one warmed step (``torch.cuda.set_sync_debug_mode("warn")``).

    python -m benchmarks.sync_sites [NAME ...]      # on a machine with a CUDA device
"""

from __future__ import annotations

import sys

from tests.method_kit import FACTORIES
from tests.test_cuda import representation_ok, sync_sites


def main() -> None:
    names = sys.argv[1:] or sorted(set(FACTORIES) - {"MoDo", "SDMGrad"})
    for name in names:
        for features in (False, True) if representation_ok(name) else (False,):
            found = sync_sites(name, features)
            where = "\n    ".join(f"{k} x{v}" for k, v in found.most_common())
            print(f"{name}{' (features)' if features else ''}: {sum(found.values())}:\n    {where}")


if __name__ == "__main__":
    main()
