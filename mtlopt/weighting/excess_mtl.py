"""ExcessMTL: robust task weighting by excess risk."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .base import Weighting, check_positive, check_state_layout, copy_tensor_state

_SQRT_EPS = 1e-7  # inside the square root of the AdaGrad denominator (Eq. 7)
_BASELINE_EPS = 1e-7  # added to the baseline before dividing
# Elements per chunk of a block: on CPU a chunk of J, of S and the work buffer stay in L2, so
# J and S cross the memory bus once per call; elsewhere chunks only cap the work buffer.
_CPU_CHUNK_ELEMENTS = 1 << 17
_DEVICE_CHUNK_ELEMENTS = 1 << 24


class ExcessMTL(Weighting):
    r"""Weights tasks by their estimated excess risk, with an exponentiated-gradient update.

    He, Zhou, Zhao and Bi, "Robust Multi-Task Learning with Excess Risks", ICML 2024
    (Eqs. 6, 7 and 9; Algorithm 1).

    Per group, ``S`` accumulates the squared per-task gradients of the group's shared
    parameters (the diagonal AdaGrad preconditioner of Eq. 7). Each step::

        S += J * J
        e_i = sum_k J_ik^2 / sqrt(S_ik + 1e-7)          (excess-risk proxy, Eq. 6)
        e  <- e / (r0 + 1e-7)                           (relative to the baseline r0)
        w  <- w * exp(eta e) / sum(...)                 (exponentiated gradient, Eq. 9)

    and the update of the shared parameters is ``d = w^T J``.

    Conventions:
        * ``w`` starts at ``1/m`` and stays on the simplex, as in the paper (the official code
          and LibMTL start at 1 and renormalise to sum ``m``, i.e. ``m`` times larger steps).
          The update runs in log space (``softmax(log w + eta e)``) so it cannot overflow.
        * Warm-up: for the first ``n_warmup_steps`` calls the weights stay uniform while
          ``S`` and ``e`` accumulate; the next call sets ``r0`` to the mean warm-up ``e`` and
          updates. The paper (App. C.1) recommends about 3 epochs of warm-up.
        * With ``n_warmup_steps = 0`` the first call's ``e`` becomes ``r0`` and that call keeps
          the uniform weights, as in the official code and LibMTL.

    Args:
        robust_step_size: ``eta``, the step of the exponentiated-gradient update (> 0).
        n_warmup_steps: calls before the weights start to move (>= 0).

    Memory: ``S`` is as large as the group's shared parameters times ``m`` (it is the size of
    the Jacobian), kept per tensor and updated in place. A call makes no other ``m x n``
    temporary: each block is worked through in cache-sized chunks (see :meth:`excess_risks`).

    Numerics: ``S`` is kept in float32 at least (half-precision sums of squares would
    overflow or stall). ``e`` is summed in float64 (its products in ``S``'s dtype), as the
    weights integrate it over the whole run.
    """

    needs = "jacobian"
    stateful = True

    def __init__(self, robust_step_size: float = 1.0, n_warmup_steps: int = 0) -> None:
        super().__init__()
        self.robust_step_size = check_positive("robust_step_size", robust_step_size)
        if isinstance(n_warmup_steps, bool) or not isinstance(n_warmup_steps, int):
            raise TypeError(
                f"n_warmup_steps: expected a non-negative int, got {type(n_warmup_steps).__name__}"
            )
        if n_warmup_steps < 0:
            raise ValueError(f"n_warmup_steps: expected a non-negative int, got {n_warmup_steps}")
        self.n_warmup_steps = n_warmup_steps
        self.squared_grad_sums: list[Tensor] | None = None
        self.log_weights: Tensor | None = None
        self.baseline: Tensor | None = None
        self.warmup_sum: Tensor | None = None
        self.calls = 0

    def hyperparameters(self) -> dict[str, Any]:
        return {"robust_step_size": self.robust_step_size, "n_warmup_steps": self.n_warmup_steps}

    @property
    def weights(self) -> Tensor | None:
        """The current task weights (on the simplex), or None before the first call."""
        return None if self.log_weights is None else self.log_weights.exp()

    def _initialise(self, jacobian: list[Tensor]) -> None:
        m = jacobian[0].shape[0] if jacobian else 0
        device = jacobian[0].device
        self.n_tasks = m
        self.log_weights = torch.full((m,), -math.log(m), dtype=torch.float64, device=device)
        self.warmup_sum = torch.zeros(m, dtype=torch.float64, device=device)

    def check_layout(self, jacobian: list[Tensor], masks: list[int] | None = None) -> None:
        holder = "ExcessMTL keeps squared-gradient sums"
        check_state_layout(holder, self.squared_grad_sums, jacobian)

    def _sums_on_device(self, jacobian: list[Tensor]) -> list[Tensor]:
        self.check_layout(jacobian)
        sums = self.squared_grad_sums
        assert sums is not None
        device = jacobian[0].device
        if any(s.device != device or not s.is_contiguous() for s in sums):
            # Chunks are taken from a flat [m, numel] view of each sum.
            sums = [s.to(device).contiguous() for s in sums]
            self.squared_grad_sums = sums
        return sums

    def excess_risks(self, jacobian: list[Tensor]) -> Tensor:
        """Accumulate ``S`` in place and return ``e`` (Eq. 6) as float64.

        Each block is cut into contiguous chunks (whole rows, or pieces of one row) and each
        chunk does all the work while it is in cache: ``S += J*J`` (which brings the chunk of
        ``J`` and ``S`` in), then ``J / sqrt(S + 1e-7)`` into a work buffer and its product with
        ``J``. So ``J`` and ``S`` are read from memory once per call, and the temporaries are
        one chunk-sized work buffer per dtype (plus one to cast half-precision chunks up).
        """
        fresh = self.squared_grad_sums is None
        if fresh:
            # Half-precision sums of squares would overflow or stall: float32 at least. The
            # first pass writes J*J (= 0 + J*J) into them, so they start uninitialised.
            sums = [
                torch.empty(
                    block.shape,
                    dtype=torch.promote_types(block.dtype, torch.float32),
                    device=block.device,
                )
                for block in jacobian
            ]
        else:
            sums = self._sums_on_device(jacobian)
        m = jacobian[0].shape[0]
        device = jacobian[0].device
        limit = _CPU_CHUNK_ELEMENTS if device.type == "cpu" else _DEVICE_CHUNK_ELEMENTS
        buffers: dict[tuple[str, torch.dtype], Tensor] = {}
        views: dict[tuple[str, torch.dtype, torch.Size], Tensor] = {}

        def buffer(kind: str, like: Tensor) -> Tensor:
            # One buffer per kind and dtype, shared by all blocks and sized for the largest
            # chunk; its views are kept too (a block's chunks have at most two shapes).
            key = (kind, like.dtype, like.shape)
            view = views.get(key)
            if view is None:
                if key[:2] not in buffers:
                    size = max(_largest_chunk(acc.numel() // m, m, limit) for acc in sums)
                    buffers[key[:2]] = torch.empty(size, dtype=like.dtype, device=device)
                view = views[key] = buffers[key[:2]][: like.numel()].view(like.shape)
            return view

        risks = torch.zeros(m, dtype=torch.float64, device=device)
        for block, acc in zip(jacobian, sums):
            width = acc.numel() // m
            pieces = _pieces_per_row(width, limit)
            partial = torch.empty(m * pieces, dtype=torch.float64, device=device)
            grad_chunks = _chunks(block.reshape(m, width), limit)
            sum_chunks = _chunks(acc.view(m, width), limit)
            if grad_chunks[0].dim() == 1:
                outs: Sequence[Tensor] = partial.unbind(0)
            else:
                outs = partial.split([chunk.shape[0] for chunk in grad_chunks])
            for grads, sq_sums, out in zip(grad_chunks, sum_chunks, outs):
                if grads.dtype != acc.dtype:
                    grads = buffer("cast", sq_sums).copy_(grads)
                scratch = buffer("work", sq_sums)
                if fresh:
                    torch.mul(grads, grads, out=sq_sums)
                else:
                    sq_sums.addcmul_(grads, grads)
                torch.add(sq_sums, _SQRT_EPS, out=scratch).sqrt_()
                torch.div(grads, scratch, out=scratch)  # J / sqrt(S + eps), times J below
                if scratch.dim() == 1:
                    # Summed in float64: e feeds an exponentiated update every step, and
                    # float32 sums (relative error ~1e-7) drift visibly over a training run.
                    torch.sum(scratch.mul_(grads), 0, dtype=torch.float64, out=out)
                else:
                    torch.sum(scratch.mul_(grads), 1, dtype=torch.float64, out=out)
            risks += partial.view(m, pieces).sum(1)
        if fresh:
            self.squared_grad_sums = sums
        return risks

    def weights_from_jacobian(self, jacobian: list[Tensor], losses: Tensor) -> Tensor:
        if not jacobian:
            raise ValueError("ExcessMTL needs at least one shared parameter in its group")
        if self.log_weights is None:
            self._initialise(jacobian)
        assert self.log_weights is not None and self.warmup_sum is not None
        if self.log_weights.device != jacobian[0].device:
            self.log_weights = self.log_weights.to(jacobian[0].device)
            self.warmup_sum = self.warmup_sum.to(jacobian[0].device)
            self.baseline = None if self.baseline is None else self.baseline.to(jacobian[0].device)
        risks = self.excess_risks(jacobian)
        self.calls += 1
        if self.calls <= self.n_warmup_steps:
            self.warmup_sum += risks
            return self.log_weights.exp()
        if self.baseline is None:
            if self.n_warmup_steps == 0:
                self.baseline = risks
                return self.log_weights.exp()
            self.baseline = self.warmup_sum / self.n_warmup_steps
        relative = risks / (self.baseline + _BASELINE_EPS)
        self.log_weights = torch.log_softmax(self.log_weights + self.robust_step_size * relative, 0)
        return self.log_weights.exp()

    def state_dict(self) -> dict[str, Any]:
        def clone(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.clone()

        return {
            "n_tasks": self.n_tasks,
            "calls": self.calls,
            "log_weights": clone(self.log_weights),
            "baseline": clone(self.baseline),
            "warmup_sum": clone(self.warmup_sum),
            "squared_grad_sums": None
            if self.squared_grad_sums is None
            else [s.clone() for s in self.squared_grad_sums],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)

        def load(name: str) -> Tensor | None:
            value = state[name]
            return None if value is None else copy_tensor_state(None, value, name)

        sums = state["squared_grad_sums"]
        self.calls = int(state["calls"])
        self.log_weights = load("log_weights")
        self.baseline = load("baseline")
        self.warmup_sum = load("warmup_sum")
        self.squared_grad_sums = (
            None
            if sums is None
            else [copy_tensor_state(None, s, f"squared_grad_sums[{k}]") for k, s in enumerate(sums)]
        )


def _pieces_per_row(width: int, limit: int) -> int:
    """How many chunks one row of ``width`` elements is cut into (1 if rows are grouped)."""
    return max(1, -(-width // limit))


def _largest_chunk(width: int, rows: int, limit: int) -> int:
    """Elements in the largest chunk :func:`_chunks` makes of a ``[rows, width]`` block."""
    pieces = _pieces_per_row(width, limit)
    if pieces > 1:
        return -(-width // pieces)
    return min(rows, max(1, limit // max(width, 1))) * width


def _chunks(flat: Tensor, limit: int) -> list[Tensor]:
    """Contiguous pieces of a contiguous ``[m, width]`` tensor, in memory order: 1-D pieces
    of a row (whole rows when only one fits in ``limit`` elements), else ``[rows, width]``
    groups of whole rows. Row chunks rather than column chunks: with power-of-two widths
    the rows of a column chunk would fall into the same cache sets and evict each other."""
    width = flat.shape[1]
    pieces = _pieces_per_row(width, limit)
    rows_per_chunk = max(1, limit // max(width, 1))
    if pieces > 1 or rows_per_chunk == 1:
        size = -(-width // pieces)
        return [piece for row in flat.unbind(0) for piece in row.split(size)]
    return list(flat.split(rows_per_chunk, 0))
