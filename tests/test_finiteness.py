"""mtlopt.finiteness: all_finite against torch.isfinite, and few_finite on small tensors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtlopt.finiteness import all_finite, few_finite

BIG = 16384


def reference(tensors: list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.sampled_from([1, 7, BIG - 1, BIG, 3 * BIG + 5]),
                   min_size=1, max_size=4),
    bad=st.lists(st.tuples(st.integers(0, 3), st.floats(0, 1),
                           st.sampled_from([float("nan"), float("inf"), -float("inf"), 3e38])),
                 max_size=3),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16]),
    transposed=st.booleans(),
)  # fmt: skip
def test_matches_isfinite(sizes, bad, dtype, transposed) -> None:
    generator = torch.Generator().manual_seed(len(sizes))
    tensors = [torch.randn(size, generator=generator).to(dtype) for size in sizes]
    for which, where, value in bad:
        if which < len(tensors):
            tensor = tensors[which]
            tensor[int(where * (tensor.numel() - 1))] = value
    if transposed and tensors[0].numel() % 2 == 0:
        tensors[0] = tensors[0].view(2, -1).t()  # not contiguous: checked value by value
    assert all_finite(tensors) == reference(tensors)


def test_huge_finite_values_are_finite() -> None:
    huge = torch.full((BIG,), 3e38)  # finite values whose squares or sum would overflow
    assert all_finite([huge])
    huge[5] = float("nan")
    assert not all_finite([huge])


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_also_and_mixed_sizes(value: float) -> None:
    big, small = torch.ones(2 * BIG, dtype=torch.float64), torch.ones(3)
    assert all_finite([big, small], also=torch.ones(2))
    assert not all_finite([big, small], also=torch.tensor([1.0, value]))
    big[-1] = value
    assert not all_finite([big, small])


def test_the_unit_scale_is_float32_whatever_the_default_dtype(monkeypatch) -> None:
    from mtlopt import finiteness

    monkeypatch.setattr(finiteness, "_ONES", {})
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert all_finite([torch.ones(3)])
        assert not all_finite([torch.tensor([1.0, float("nan")])])
    finally:
        torch.set_default_dtype(default)
    assert finiteness._ONES[torch.device("cpu")].dtype == torch.float32


def test_the_flag_is_per_thread_and_usable_in_inference_mode() -> None:
    """The cached flag is zeroed before every check (a non-finite result does not stick),
    works when first made under inference mode, and each thread has its own."""
    import threading

    bad = torch.tensor([1.0, float("nan")])
    with torch.inference_mode():
        assert not all_finite([bad])
        assert all_finite([torch.ones(2)])
    assert not all_finite([bad])
    assert all_finite([torch.ones(2)])
    results: dict[int, set[bool]] = {0: set(), 1: set()}

    def check(which: int, tensors: list[torch.Tensor]) -> None:
        for _ in range(200):
            results[which].add(all_finite(tensors))

    threads = [
        threading.Thread(target=check, args=(k, [t])) for k, t in enumerate((bad, torch.ones(3)))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {0: {False}, 1: {True}}


def test_sparse_and_dense_together() -> None:
    sparse = torch.sparse_coo_tensor([[0, 2]], torch.tensor([1.0, 2.0]), (4,))
    assert all_finite([torch.ones(3), sparse])
    assert not all_finite([torch.ones(3), sparse], also=torch.tensor([float("inf")]))
    bad = torch.sparse_coo_tensor([[0, 2]], torch.tensor([1.0, float("nan")]), (4,))
    assert not all_finite([torch.ones(3), bad])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_few_finite_on_small_tensors_and_views(dtype: torch.dtype) -> None:
    gramian = torch.eye(4, dtype=dtype) * 3.0
    assert few_finite(gramian.diagonal())  # a strided view
    assert few_finite(torch.tensor(2.5, dtype=dtype))  # 0-d
    for bad in (float("nan"), float("inf"), float("-inf")):
        broken = gramian.clone()
        broken[2, 2] = bad
        assert not few_finite(broken.diagonal())
        broken = gramian.clone()
        broken[0, 1] = bad  # off the diagonal: not part of the view checked
        assert few_finite(broken.diagonal())
