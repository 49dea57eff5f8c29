"""Counting, on the CPU, the calls that would make a GPU wait for the host.

CI has no GPU, so ``torch.cuda.set_sync_debug_mode`` cannot run there. This mode sees most
such calls from Python: reading values back (``item``, ``tolist``, ``bool(t)``, ``.cpu()``,
...), indexing by a 0-dim tensor (turned into a Python int) or by a boolean mask, the ops
whose output size depends on the values (``nonzero``, one-argument ``where``,
``masked_select``, ``unique``, ``repeat_interleave`` without ``output_size``),
``torch.equal``, and the decompositions whose errors torch checks on the host. It cannot
see a blocking copy from the CPU to a device (on the CPU there is none), nor calls inside
autograd hooks (a mode does not reach them). Run a step under it with
``host_linalg.HOST_READS = False`` (the device code, with no CPU shortcut).
"""

from __future__ import annotations

import collections
import traceback

import torch
from torch.overrides import TorchFunctionMode

READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"}
#: Output sizes that depend on the values: the host must learn them.
DATA_DEPENDENT = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive"}
#: torch checks these decompositions' error codes on the host (their ``_ex`` forms do not).
CHECKED_DECOMPOSITIONS = {
    f"linalg_{name}"
    for name in ("eigh", "eigvalsh", "svd", "svdvals", "pinv", "cholesky", "inv", "solve", "lstsq")
}
INDEXING = {"__getitem__", "__setitem__"}


def _waiting_index(index: object) -> bool:
    """A 0-dim integer index (read as a Python int) or a boolean mask (sized by its values)."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(
        isinstance(p, torch.Tensor)
        and ((p.dim() == 0 and not p.is_floating_point()) or p.dtype == torch.bool)
        for p in parts
    )


class DeviceReads(TorchFunctionMode):
    """Counts such calls by the innermost mtlopt source line that made them."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        kwargs = kwargs or {}
        waits = (
            name in READS
            or name in DATA_DEPENDENT
            or name == "equal"
            or name in CHECKED_DECOMPOSITIONS
            or (name in INDEXING and len(args) > 1 and _waiting_index(args[1]))
            or (name == "where" and len(args) + len(kwargs) == 1)
            or (name == "repeat_interleave" and "output_size" not in kwargs)
        )
        if waits:
            self.sites[self._site()] += 1
        return func(*args, **kwargs)

    @staticmethod
    def _site() -> str:
        for frame in reversed(traceback.extract_stack()[:-2]):
            if "/mtlopt/" in frame.filename:
                return f"{frame.filename.split('/mtlopt/')[-1]}:{frame.name}"
        return "outside mtlopt"
