"""Representation mode's per-task gradients of ``z`` kept as two small factors, for heads
that read ``z`` through a matrix product.

A head whose operation on the representation ``z`` (``[B, d]``) is a matrix product
(``nn.Linear``'s ``addmm(b, z, W^T)``, or ``z @ A``) sends ``z`` the gradient
``r = alpha G A^T``: ``G`` (``[B, k]``) is the gradient of the product's output, ``A``
(``[d, k]``) the factor autograd saved for that derivative, ``alpha`` the product's scale.
Autograd computes ``r`` anyway, but what the weightings need follows from the factors
without reading it (the trace identity ``<G_a A_a^T, G_b A_b^T> = sum((G_a^T G_b) *
(A_a^T A_b))``)::

    <r_a, r_b>     = alpha_a alpha_b sum((G_a^T G_b) * (A_a^T A_b))
    sum_t w_t r_t  = [w_t alpha_t G_t]_t @ [A_t]_t^T                  (one matrix product)

With ``K`` the heads' outputs in all, that is ``K^2 (B + d)`` multiply-adds for the Gramian
and ``K B d`` for the direction, against ``m^2 B d`` for the Gramian of materialised rows
and ``m B d`` each for the direction and for copying the rows as they arrive (memory-bound
passes, the slower kind). A task with several products (a head reading ``z`` twice, two
heads) has its terms summed.

The factors serve a step when every node that feeds ``z`` is such a product (``z`` as its
first matrix, the other saved by autograd in ``z``'s dtype and device), ``z`` is a real
2-D tensor, the rows would hold at least :data:`MIN_ROWS_ELEMENTS` entries and the count
above is the smaller: the case of regression and classification heads with a few outputs
each. Otherwise the step materialises the rows (:class:`mtlopt.task_cut.CrossingRows`).
Each ``G`` is copied into one ``[B, K]`` buffer as its head hands it over (``B x k``
numbers: no later in-place change of that gradient reaches the Gramian), and the Gramian
is formed in float64 from the factors (more accurate than the float32 products of
materialised rows); the direction is one product in ``z``'s dtype.

Not seen: a hook registered on a head's own autograd node (``grad_fn.register_hook``, or
the deprecated ``Module.register_backward_hook``) that changes the gradient it sends to
``z``; the factors are those of the product itself. Hooks on tensors are seen. Set
:data:`ENABLED` to False to materialise the rows instead.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .nosync import upload
from .task_cut import Crossing, TaskCut

#: Take the factors where they apply (off, the materialised rows always serve; the tests
#: compare the two).
ENABLED = True

#: Fewest entries of the rows (``m B d``) for which the factors serve: below it the rows are
#: small enough that copying and multiplying them costs less than the factors' dozen extra
#: small operations (the benchmark Transformer, 10 x 16 x 64: 0.1 ms slower with factors;
#: its CNN, 10 x 32 x 128: even; the MLP, 10 x 256 x 512: 0.6 ms faster).
MIN_ROWS_ELEMENTS = 1 << 16

#: Autograd nodes of matrix products whose gradient for ``z`` is ``alpha grad @ mat2^T``,
#: and the input position of ``z`` (``mat1``) in each.
_PRODUCTS = {"AddmmBackward0": 1, "MmBackward0": 0}


class FactoredRows:
    """The crossings of one backward pass into ``z``, as factors: ``crossed`` is the
    feeders' hook (see :func:`mtlopt.task_cut.hold_crossings`), :meth:`gramian` and
    :meth:`direction` read them once every head is done."""

    def __init__(self, features: Tensor, n_tasks: int, feeders: list[_Feeder]) -> None:
        self.n_tasks = n_tasks
        self._like = features.detach()  # z's shape, dtype and device (a zero direction)
        self._slots = {feeder.node: feeder for feeder in feeders}
        self._factors = [feeder.factor for feeder in feeders]
        #: The task of each column (feeders in task order, ``k`` columns each).
        self._tasks = [feeder.task for feeder in feeders for _ in range(feeder.factor.shape[1])]
        self._grads: Tensor | None = None  # [B, K]: each alpha G in its columns, once seen
        # After gramian(): all G side by side, all A side by side, and the task of each
        # column on the device (None when column t is task t's).
        self._columns: tuple[Tensor, Tensor, Tensor | None] | None = None

    @classmethod
    def for_cut(cls, cut: TaskCut, features: Tensor, n_tasks: int) -> FactoredRows | None:
        """The factors of every feeder of ``z`` (the cut's one target), or None where a
        feeder is not a plain matrix product of ``z`` or the factors would cost more."""
        if (
            not ENABLED
            or features.dim() != 2
            or features.layout != torch.strided
            or features.is_complex()
        ):
            return None
        batch, width = features.shape
        if n_tasks * batch * width < MIN_ROWS_ELEMENTS:
            return None
        feeders = []
        columns = 0
        for node, task, edges in sorted(cut.feeders, key=lambda feeder: feeder[1]):
            position = _PRODUCTS.get(type(node).__name__)
            if position is None or [p for p, _ in edges] != [position]:
                return None
            try:
                factor = node._saved_mat2  # type: ignore[attr-defined]
                scale = node._saved_alpha if position == 1 else 1.0  # type: ignore[attr-defined]
            except (AttributeError, RuntimeError):  # another torch, or the graph was freed
                return None
            if not (
                isinstance(factor, Tensor)
                and factor.layout == torch.strided
                and factor.dim() == 2
                and factor.shape[0] == width
                and factor.dtype == features.dtype
                and factor.device == features.device
                and type(scale) in (int, float)
            ):
                return None
            # Detached: the factor is a view of the head's weight, and the Gramian must not
            # carry a graph (it is weighed after the backward when nothing below z is).
            k = factor.shape[1]
            feeders.append(_Feeder(node, task, factor.detach(), float(scale), columns))
            columns += k
        # Multiply-adds of the factors' Gramian and direction against the rows' Gramian,
        # direction and copy.
        factored = columns * columns * (batch + width) + columns * batch * width
        if factored > (n_tasks + 2) * n_tasks * batch * width:
            return None
        return cls(features, n_tasks, feeders)

    def crossed(self, crossing: Crossing) -> None:
        """A feeder's hook: copy the gradient of its output (``G``, times ``alpha``) into its
        columns; the gradient of ``z`` it computed is not read."""
        grad = crossing.grad_outputs[0]
        if grad is None:
            return
        feeder = self._slots[crossing.node]
        if self._grads is None:  # zeros: a feeder that never runs contributes nothing
            self._grads = grad.new_zeros(grad.shape[0], len(self._tasks))
        columns = self._grads[:, feeder.start : feeder.start + feeder.factor.shape[1]]
        if feeder.scale == 1.0:
            columns.copy_(grad)
        else:
            torch.mul(grad, feeder.scale, out=columns)

    def gramian(self) -> Tensor:
        """The ``[m, m]`` float64 Gramian of the tasks' gradients of ``z`` (zero rows for the
        tasks whose heads sent none)."""
        m = self.n_tasks
        grads = self._grads
        if grads is None:
            return torch.zeros(m, m, dtype=torch.float64, device=self._like.device)
        factors = torch.cat(self._factors, dim=1)  # [d, K]
        grads64, factors64 = grads.double(), factors.double()
        products = (grads64.T @ grads64).mul_(factors64.T @ factors64)  # [K, K]
        if self._tasks == list(range(m)):  # one column per task, in order (the usual heads)
            self._columns = (grads, factors, None)
            return products
        owner = upload(torch.tensor(self._tasks), products.device)
        self._columns = (grads, factors, owner)
        owners = upload(torch.eye(m, dtype=torch.float64)[self._tasks], products.device)
        return owners.T @ products @ owners  # [m, m]: each task's columns summed

    def direction(self, weights: Tensor) -> Tensor:
        """``sum_t weights_t r_t``, ``z``'s gradient for the encoder (after :meth:`gramian`)."""
        if self._columns is None:  # no head sent z a gradient
            return torch.zeros_like(self._like)
        grads, factors, owner = self._columns
        coefficients = weights if owner is None else weights.index_select(0, owner)
        return (grads * coefficients.to(grads.dtype)) @ factors.T


class _Feeder(NamedTuple):
    """A head's product node that reads ``z``: its task, its saved factor ``A`` (detached),
    its scale ``alpha`` and its first column among all the heads'."""

    node: object
    task: int
    factor: Tensor
    scale: float
    start: int
