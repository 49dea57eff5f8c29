"""Counting, on the CPU, the calls that would make a GPU wait for the host.

CI has no GPU, so ``torch.cuda.set_sync_debug_mode`` cannot run there. This mode sees the
same calls from Python: reading a value back (``item``, ``tolist``, ``bool(t)``, ...),
indexing by a 0-dim tensor (turned into a Python int), ``torch.equal`` and the
decompositions whose errors torch checks on the host. Run a step under it with
``host_linalg.HOST_READS = False`` (the device code, with no CPU shortcut).
"""

from __future__ import annotations

import collections
import traceback

import torch
from torch.overrides import TorchFunctionMode

READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero", "numpy"}
#: torch checks these decompositions' error codes on the host (their ``_ex`` forms do not).
CHECKED_DECOMPOSITIONS = {
    f"linalg_{name}"
    for name in ("eigh", "eigvalsh", "svd", "svdvals", "pinv", "cholesky", "inv", "solve", "lstsq")
}
INDEXING = {"__getitem__", "__setitem__"}


def _zero_dim_index(index: object) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(
        isinstance(p, torch.Tensor) and p.dim() == 0 and not p.is_floating_point() for p in parts
    )


class DeviceReads(TorchFunctionMode):
    """Counts such calls by the innermost mtlopt source line that made them."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        waits = (
            name in READS
            or name == "equal"
            or name in CHECKED_DECOMPOSITIONS
            or (name in INDEXING and len(args) > 1 and _zero_dim_index(args[1]))
        )
        if waits:
            self.sites[self._site()] += 1
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _site() -> str:
        for frame in reversed(traceback.extract_stack()[:-2]):
            if "/mtlopt/" in frame.filename:
                return f"{frame.filename.split('/mtlopt/')[-1]}:{frame.name}"
        return "outside mtlopt"
