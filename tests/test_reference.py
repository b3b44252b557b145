"""The reference ConvMixer is the paper's model."""

import pytest
import torch
from torch import nn

from convmixer_kernels.reference import ConvMixer, Residual


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_parameter_count_768_32():
    assert n_params(ConvMixer(768, 32, kernel_size=7, patch_size=7, n_classes=1000)) == 21_110_248


def test_structure():
    m = ConvMixer(16, 2, kernel_size=5, patch_size=2, n_classes=10, activation=nn.ReLU)
    stem_conv, act, bn = m[0], m[1], m[2]
    assert isinstance(stem_conv, nn.Conv2d) and stem_conv.kernel_size == (2, 2) and stem_conv.stride == (2, 2)
    assert isinstance(act, nn.ReLU) and isinstance(bn, nn.BatchNorm2d)
    for blk in (m[3], m[4]):
        res, pw, a, n = blk
        assert isinstance(res, Residual)
        dw, a2, n2 = res.fn
        assert dw.groups == 16 and dw.kernel_size == (5, 5) and dw.padding == "same"
        assert isinstance(a2, nn.ReLU) and isinstance(n2, nn.BatchNorm2d)  # norm after the activation
        assert pw.kernel_size == (1, 1) and isinstance(a, nn.ReLU) and isinstance(n, nn.BatchNorm2d)
    assert isinstance(m[5], nn.AdaptiveAvgPool2d) and isinstance(m[6], nn.Flatten) and isinstance(m[7], nn.Linear)
    assert "3.0.fn.0.weight" in m.state_dict()  # the paper's nn.Sequential keys


def test_forward_and_residual():
    torch.manual_seed(0)
    m = ConvMixer(8, 1, kernel_size=3, patch_size=4, n_classes=5).eval()
    x = torch.randn(2, 3, 17, 23)  # not divisible by p: the conv drops the remainder
    assert m(x).shape == (2, 5)
    h = m[2](m[1](m[0](x)))
    assert h.shape == (2, 8, 4, 5)
    res = m[3][0]
    torch.testing.assert_close(res(h), res.fn(h) + h)


def test_bad_arguments():
    with pytest.raises(ValueError, match="dim, depth"):
        ConvMixer(0, 2)
