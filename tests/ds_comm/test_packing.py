import pytest
import torch

from ds_comm._packing import pack_signs, sign_pm1, signs_times, unpack_bits


def test_bit_order_is_least_significant_first():
    x = torch.tensor([1.0, -1, -1, -1, -1, -1, -1, -1, -1, 1, 1, -1, -1, -1, -1, 1])
    assert pack_signs(x).tolist() == [0b00000001, 0b10000110]


def test_zero_and_negative_zero_pack_as_nonnegative_and_nan_as_negative():
    x = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-45, -1e-45, 5.0])
    assert unpack_bits(pack_signs(x)).tolist() == [True, True, False, True, False, True, False, True]
    assert sign_pm1(torch.tensor([0.0, -0.0, -2.0])).tolist() == [1.0, 1.0, -1.0]


@pytest.mark.parametrize("numel", [8, 64, 8 * 1001])
def test_round_trip(numel):
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    assert torch.equal(unpack_bits(pack_signs(x)), x >= 0)


def test_signs_times_scales_each_row():
    x = torch.tensor([[1.0, -1, 1, 1, -1, -1, 1, -1], [-1.0, -1, -1, -1, 1, 1, 1, 1]])
    packed = torch.stack([pack_signs(r) for r in x])
    out = signs_times(packed, torch.tensor([2.0, 0.5]))
    assert torch.equal(out, x * torch.tensor([[2.0], [0.5]]))


def test_pack_needs_multiple_of_eight():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_signs(torch.ones(12))
