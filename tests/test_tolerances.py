"""The derived-tolerance helper: its bound holds for real float32 reorderings and catches a real difference."""

import numpy as np
import pytest
import torch

from tolerances import assert_bitwise_equal, assert_close_derived, gamma, matmul_scale, unit_roundoff


def test_unit_roundoff_and_gamma():
    assert unit_roundoff(torch.float32) == 2.0 ** -24 and unit_roundoff(np.float64) == 2.0 ** -53
    assert gamma(10, torch.float32) == pytest.approx(10 * 2.0 ** -24, rel=1e-6)
    with pytest.raises(ValueError):
        gamma(2 ** 24, torch.float32)


def test_bound_holds_for_reordered_float32_matmuls_and_catches_a_lost_term():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 300, generator=g), torch.randn(300, 40, generator=g)
    exact = a.double() @ b.double()
    blocked = sum(a[:, i:i + 7] @ b[i:i + 7] for i in range(0, 300, 7))  # another summation order
    scale = matmul_scale(a, b)
    assert_close_derived(a @ b, blocked, n_terms=300, scale=scale, dtype=torch.float32, msg="two orders")
    assert_close_derived(a @ b, exact, n_terms=300, scale=scale, dtype=torch.float32, computations=1, msg="vs exact")
    lost = a[:, :-1] @ b[:-1]  # one of the 300 products missing: a real error, far above rounding
    with pytest.raises(AssertionError, match=r"max \|diff\|"):
        assert_close_derived(lost, exact, n_terms=300, scale=scale, dtype=torch.float32)


def test_bitwise_equal_reports_the_difference():
    x = torch.ones(4)
    assert_bitwise_equal(x, x.clone())
    with pytest.raises(AssertionError, match=r"1 of 4 elements differ, max \|diff\| 1\.19e-07"):
        assert_bitwise_equal(x, torch.tensor([1.0, 1.0, 1.0, 1.0 + 2.0 ** -23]))
