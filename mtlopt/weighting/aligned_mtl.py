"""Aligned-MTL: align the principal components of the task gradients."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..solvers import gramian_rtol
from .base import Weighting

SCALE_MODES = ("min", "median", "rmse")


def aligned_mtl_weights(gramian: Tensor, scale_mode: str, rtol: float) -> Tensor:
    """``w = B 1`` with the balance transformation ``B = sigma_R V Sigma^-1 V^T`` of ``G``.

    ``G = V Lambda V^T`` (``Lambda = Sigma^2``); eigenvalues at or below ``rtol`` times the
    largest are dropped (their directions carry no gradient). ``sigma_R^2`` is the smallest
    kept eigenvalue (``"min"``), the lower median of the kept eigenvalues (``"median"``, as
    ``torch.median``) or their mean (``"rmse"``: ``sigma_R`` is then the RMS singular value).
    All gradients zero: zero weights.
    """
    m = gramian.shape[0]
    largest = gramian.diagonal().amax()
    # B depends on ratios of eigenvalues only: normalise so the cut-off is scale-free.
    normalised = gramian / torch.where(largest > 0, largest, torch.ones_like(largest))
    eigenvalues, eigenvectors = torch.linalg.eigh(normalised)
    keep = eigenvalues > rtol * eigenvalues.amax().clamp(min=0)
    kept_count = keep.sum()
    if scale_mode == "min":
        reference = torch.where(keep, eigenvalues, torch.inf).amin()
    elif scale_mode == "median":
        ordered = torch.where(keep, eigenvalues, torch.inf).sort().values  # kept ones first
        index = ((kept_count - 1).clamp(min=0) // 2).reshape(1)
        reference = ordered.gather(0, index).squeeze(0)
    else:
        total = torch.where(keep, eigenvalues, torch.zeros_like(eigenvalues)).sum()
        reference = total / kept_count.clamp(min=1)
    safe = torch.where(keep, eigenvalues, torch.ones_like(eigenvalues))
    inverse_sqrt = torch.where(keep, safe.rsqrt(), torch.zeros_like(eigenvalues))
    reference = torch.where(kept_count > 0, reference, torch.zeros_like(reference))
    ones = torch.ones(m, dtype=gramian.dtype, device=gramian.device)
    # B 1 = sigma_R V (Sigma^-1 (V^T 1)), without forming B.
    return reference.sqrt() * (eigenvectors @ (inverse_sqrt * (eigenvectors.T @ ones)))


class AlignedMTL(Weighting):
    r"""Aligned-MTL: rescale the gradient system so that all its singular values are equal.

    Senushkin, Patakin, Kuznetsov and Konushin, "Independent Component Alignment for
    Multi-Task Learning", CVPR 2023 (Algorithm 1).

    With the gradient matrix ``J = U Sigma V^T`` (rows ``g_i``), Aligned-MTL replaces it by
    ``J_hat = sigma_R U V^T``, whose condition number is 1, and updates with
    ``d = J_hat^T w``. Everything comes from the Gramian: ``G = J J^T = U Sigma^2 U^T``
    (``torch.linalg.eigh``) and ``J_hat = B J`` with the balance transformation
    ``B = sigma_R U Sigma^-1 U^T``, so the task weights are ``B w``.

    Conventions:
        * ``scale_mode`` picks ``sigma_R`` as in the authors' code: ``"min"`` the smallest
          singular value (the paper's Algorithm 1, default), ``"median"`` the median one
          (``torch.median``'s lower median for an even count), ``"rmse"`` the root mean square
          of the singular values.
        * Zero singular values (rank-deficient ``J``: duplicate, collinear or zero gradients)
          are dropped: eigenvalues of ``G`` at or below ``10 m eps_float32`` times the largest
          are treated as zero, which is the library-wide cut-off for Gramians of float32
          gradients (the authors' code, LibMTL and torchjd use ``m eps_float32``). The update
          then lives in the span of the kept components. All gradients zero: zero weights.
        * Weighting after alignment (the paper's ``theta <- theta - alpha J_hat^T w``) with
          ``w = 1``: the update is the *sum* of the aligned gradients, as in the authors' code
          and LibMTL (``B.sum``). torchjd uses ``w = 1/m`` (the mean, ``m`` times smaller).

    Order-free (``B`` is a matrix function of ``G``), scale-equivariant (``d`` scales with
    ``J``). Task heads receive their own gradient.

    Args:
        scale_mode: ``"min"``, ``"median"`` or ``"rmse"``.
    """

    needs = "gramian"
    solves_on_host = True

    def __init__(self, scale_mode: str = "min") -> None:
        super().__init__()
        if scale_mode not in SCALE_MODES:
            raise ValueError(f"scale_mode: expected one of {SCALE_MODES}, got {scale_mode!r}")
        self.scale_mode = scale_mode

    def hyperparameters(self) -> dict[str, Any]:
        return {"scale_mode": self.scale_mode}

    def weights_from_gramian(self, gramian: Tensor, losses: Tensor) -> Tensor:
        rtol = gramian_rtol(torch.float32, gramian.shape[0])
        return aligned_mtl_weights(gramian, self.scale_mode, rtol)
