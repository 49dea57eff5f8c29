"""Gramian weightings run on the CPU when the gradients live on an accelerator.

An m x m problem is a few kilobytes. On a GPU its synchronisation-free solvers (fixed
iteration counts, every branch a ``torch.where``) launch thousands of tiny kernels: on an
H200, UPGrad's weighting took 47 ms and CAGrad's 186 ms at m = 10. A copy of the Gramian
to the host costs one synchronisation, and the step already makes one to decide whether the
gradients are finite: the Gramians travel with that decision
(:func:`mtlopt.finiteness.all_finite_reading`; in representation mode, where the weights
are needed in the middle of the backward pass, all groups' Gramians come back in one read of
their own), the weightings run their CPU code (exact,
stopping when done, on Python floats for few tasks), and the m weights go back to the
device without waiting (:func:`mtlopt.nosync.upload`).

Only weightings whose answer depends on the Gramian, the loss values and their own small
state take this path (``Weighting.solves_on_host``); their state then lives on the CPU.
``ENABLED = False`` keeps every weighting on the gradients' device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .losses import host_values
from .nosync import upload

if TYPE_CHECKING:
    from .weighting.base import Weighting

#: Whether weightings that can run on a CPU copy of the Gramian do so off the CPU.
ENABLED = True


def off_host(tensor: Tensor) -> bool:
    """Whether ``tensor`` lives off the CPU (tests patch this to run the path on the CPU)."""
    return tensor.device.type != "cpu"


def wants_host_copy(weighting: Weighting, gramian: Tensor | None) -> bool:
    """Whether ``weighting`` should run on a CPU copy of ``gramian``."""
    return ENABLED and gramian is not None and weighting.solves_on_host and off_host(gramian)


def weights_on(
    weighting: Weighting, gramian: Tensor, on_host: Tensor | None, losses: Tensor
) -> Tensor:
    """``weighting.weights_from_gramian`` on the CPU copy ``on_host`` if there is one (its
    weights uploaded to the Gramian's device), else on ``gramian`` itself."""
    if on_host is None:
        return weighting.weights_from_gramian(gramian, losses)
    # The optimizer has read the loss values already: reuse that read.
    host_losses = torch.tensor(host_values(losses), dtype=losses.dtype)
    weights = weighting.weights_from_gramian(on_host, host_losses)
    return upload(weights, gramian.device)
