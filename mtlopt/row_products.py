"""``A B^T`` for a few long rows (Gramians of per-task gradients), fast on CPU BLAS too.

A Gramian multiplies m rows of n entries: m is small (the tasks), n large (a tensor's
size). For m between 3 and 15 and n past ~50k, MKL's CPU GEMM takes a slow, single-threaded
path: ``[10 x 262144] @ [262144 x 10]`` runs at about 2.2 ms on two cores, memory-bound
work that should take a fifth of that. Cutting the columns into ``SLICE`` wide slices and
multiplying them as one batched GEMM (no copy: the slices are strided views) gets 0.43 ms,
and summing the per-slice partial products is also more accurate. Outside that range the
plain product is as fast or faster (measured with ``benchmarks``' workloads, torch 2.13
with MKL 2024.2), and other devices (cuBLAS) always take the plain product.
"""

from __future__ import annotations

import torch
from torch import Tensor

SLICE = 1024  #: columns per batched slice
MIN_COLUMNS = 65536  #: below this the plain product is fast enough
FEW_ROWS = range(3, 16)  #: row counts for which MKL's plain product is slow


def row_products(rows: Tensor, others: Tensor | None = None) -> Tensor:
    """``rows @ others.T`` (``others`` defaults to ``rows``) for 2-D ``[m, n]`` inputs."""
    other = rows if others is None else others
    m, n = rows.shape
    if rows.device.type != "cpu" or m not in FEW_ROWS or n < MIN_COLUMNS:
        return rows @ other.T
    whole = n - n % SLICE
    batches = whole // SLICE
    left = rows[:, :whole].view(m, batches, SLICE).transpose(0, 1)
    right = other[:, :whole].view(m, batches, SLICE).permute(1, 2, 0)
    product = torch.bmm(left, right).sum(0)
    if whole < n:
        product += rows[:, whole:] @ other[:, whole:].T
    return product
