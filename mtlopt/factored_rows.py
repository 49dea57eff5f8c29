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
passes, the slower kind). The factors serve where their count is the smaller, which is
the case of regression and classification heads with a few outputs each; a task with
several products (a head reading ``z`` twice, two heads) has its terms summed. Any other
head (whose operation on ``z`` is not a plain matrix product, or a ``z`` of more than two
dimensions) keeps the materialised rows (:class:`mtlopt.task_cut.CrossingRows`).

The Gramian is formed in float64 from the factors (more accurate than the float32 products
of materialised rows); the direction is one product in ``z``'s dtype.
"""

from __future__ import annotations

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

    def __init__(
        self, features: Tensor, n_tasks: int, factors: dict[object, tuple[Tensor, float]]
    ) -> None:
        self.n_tasks = n_tasks
        self._like = features.detach()  # z's shape, dtype and device (a zero direction)
        self._factors = factors  # feeder node -> (A [d, k], alpha)
        self._crossings: list[tuple[int, Tensor, Tensor]] = []  # (task, alpha G, A)
        # After gramian(): all G side by side, all A side by side, and the task of each
        # column (None when it is column t for task t).
        self._columns: tuple[Tensor, Tensor, Tensor | None] | None = None

    @classmethod
    def for_cut(cls, cut: TaskCut, features: Tensor, n_tasks: int) -> FactoredRows | None:
        """The factors of every feeder of ``z`` (the cut's one target), or None where a
        feeder is not a plain matrix product of ``z`` or the factors would cost more."""
        if not ENABLED or features.dim() != 2 or features.layout != torch.strided:
            return None
        batch, width = features.shape
        if n_tasks * batch * width < MIN_ROWS_ELEMENTS:
            return None
        factors: dict[object, tuple[Tensor, float]] = {}
        for node, _, edges in cut.feeders:
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
            factors[node] = (factor, float(scale))
        # Multiply-adds of the factors' Gramian and direction against the rows' Gramian,
        # direction and copy.
        columns = sum(factor.shape[1] for factor, _ in factors.values())
        factored = columns * columns * (batch + width) + columns * batch * width
        if factored > (n_tasks + 2) * n_tasks * batch * width:
            return None
        return cls(features, n_tasks, factors)

    def crossed(self, crossing: Crossing) -> None:
        """A feeder's hook: keep the gradient of its output (``G``), not the one of ``z``."""
        grad = crossing.grad_outputs[0]
        if grad is None:
            return
        factor, scale = self._factors[crossing.node]
        self._crossings.append((crossing.task, grad if scale == 1.0 else grad * scale, factor))

    def gramian(self) -> Tensor:
        """The ``[m, m]`` float64 Gramian of the tasks' gradients of ``z`` (zero rows for the
        tasks whose heads sent none)."""
        m = self.n_tasks
        if not self._crossings:
            return torch.zeros(m, m, dtype=torch.float64, device=self._like.device)
        tasks = [task for task, grad, _ in self._crossings for _ in range(grad.shape[1])]
        grads = torch.cat([grad for _, grad, _ in self._crossings], dim=1)  # [B, K]
        factors = torch.cat([factor for _, _, factor in self._crossings], dim=1)  # [d, K]
        grads64, factors64 = grads.double(), factors.double()
        products = (grads64.T @ grads64).mul_(factors64.T @ factors64)  # [K, K]
        if tasks == list(range(m)):  # one column per task, in task order (the usual heads)
            self._columns = (grads, factors, None)
            return products
        owner = upload(torch.tensor(tasks), products.device)  # the task of each column
        self._columns = (grads, factors, owner)
        owners = upload(torch.eye(m, dtype=torch.float64)[tasks], products.device)  # [K, m]
        return owners.T @ products @ owners  # each task's columns summed

    def direction(self, weights: Tensor) -> Tensor:
        """``sum_t weights_t r_t``, ``z``'s gradient for the encoder (after :meth:`gramian`)."""
        if self._columns is None:  # no head sent z a gradient
            return torch.zeros_like(self._like)
        grads, factors, owner = self._columns
        coefficients = weights if owner is None else weights.index_select(0, owner)
        return (grads * coefficients.to(grads.dtype)) @ factors.T
