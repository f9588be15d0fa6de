"""The shared kernel-test helpers must themselves catch wrong kernels."""

import pytest
import torch

from lavin_fast.testing import assert_close_to_reference, poisoned_allocations


def test_poison_makes_unwritten_elements_fail():
    with poisoned_allocations():
        out = torch.empty(8)
        out[:7] = 1.0  # a "kernel" that forgets the last element
        also = torch.empty_like(out)
    assert torch.isnan(out[7]) and torch.isnan(also).all()
    with pytest.raises(AssertionError, match="not finite"):
        assert_close_to_reference(out, torch.ones(8, dtype=torch.float64))
    assert not torch.isnan(torch.empty(4).fill_(0)).any()  # restored afterwards


def test_tolerance_is_relative_to_reference_error_in_dtype():
    x = torch.randn(1000, dtype=torch.float64)
    ref64 = x.exp()
    ref16 = x.half().exp()
    assert_close_to_reference(x.half().float().exp().half(), ref64, ref16)  # as good as torch in fp16
    wrong = ref16.clone()
    wrong[3] += 0.1  # an error far beyond fp16 rounding
    with pytest.raises(AssertionError, match="exceeds"):
        assert_close_to_reference(wrong, ref64, ref16)


def test_shape_mismatch_fails():
    with pytest.raises(AssertionError, match="shape"):
        assert_close_to_reference(torch.zeros(3), torch.zeros(4, dtype=torch.float64))
