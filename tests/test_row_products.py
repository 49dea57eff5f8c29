"""row_products: A B^T by column slices, against a float64 matrix product."""

from __future__ import annotations

import pytest
import torch

from mtlopt.row_products import MIN_COLUMNS, SLICE, row_products


@pytest.mark.parametrize("m", [1, 2, 3, 10, 15, 16, 40])
@pytest.mark.parametrize("n", [7, MIN_COLUMNS - 1, MIN_COLUMNS, MIN_COLUMNS + SLICE // 2 + 3])
def test_matches_a_float64_product(m: int, n: int) -> None:
    g = torch.Generator().manual_seed(m * 1000 + n)
    a = torch.randn(m, n, generator=g)
    b = torch.randn(m, n, generator=g)
    for others, expected in [(None, a.double() @ a.double().T), (b, a.double() @ b.double().T)]:
        got = row_products(a, others)
        assert got.shape == (m, m) and got.dtype == torch.float32
        scale = (
            a.double().norm(dim=1).max() * (a if others is None else b).double().norm(dim=1).max()
        )
        assert (got.double() - expected).abs().max() <= 1e-5 * scale


def test_strided_rows_of_a_larger_block() -> None:
    block = torch.randn(10, 2, MIN_COLUMNS + 5)
    rows = block[:, 1, :]  # not contiguous: the slices must still read the right entries
    expected = rows.double() @ rows.double().T
    torch.testing.assert_close(row_products(rows).double(), expected, rtol=1e-5, atol=1e-3)
