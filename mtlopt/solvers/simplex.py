"""Euclidean projection onto the probability simplex."""

from __future__ import annotations

import torch
from torch import Tensor


def project_simplex(points: Tensor, total: float = 1.0) -> Tensor:
    """Project each row of ``points`` (or the vector) onto ``{w >= 0, sum w = total}``.

    The sort-based algorithm of Held, Wolfe and Crowder (1974) (see also Duchi et al., ICML
    2008, Fig. 1): with ``u`` sorted in decreasing order, ``rho`` the last index where
    ``u_k > (cumsum(u)_k - total) / k``, the projection is ``max(points - theta, 0)`` with
    ``theta = (cumsum(u)_rho - total) / rho``. Exact, batched, no host synchronisation.
    """
    squeeze = points.dim() == 1
    rows = points.unsqueeze(0) if squeeze else points
    # Shifting every entry by the same amount does not change the projection; measuring from
    # the largest entry keeps the cumulative sums exact for huge inputs.
    rows = rows - rows.amax(-1, keepdim=True)
    m = rows.shape[-1]
    ordered = rows.sort(dim=-1, descending=True).values
    cumulative = ordered.cumsum(-1) - total
    ks = torch.arange(1, m + 1, device=rows.device, dtype=rows.dtype)
    support = ordered * ks > cumulative
    # The support is a prefix; its length is the number of True entries.
    rho = support.sum(-1, keepdim=True).clamp(min=1)
    theta = cumulative.gather(-1, rho - 1) / rho.to(rows.dtype)
    projected = (rows - theta).clamp(min=0)
    return projected.squeeze(0) if squeeze else projected
