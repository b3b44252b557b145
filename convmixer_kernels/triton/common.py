"""Device helpers shared by the Triton kernels (inlined into them): the run-time activation switch."""

import triton
import triton.language as tl


@triton.jit
def _tanh(z):
    # tanh through exp (the common tl API has no tanh); exact limits +-1 for large |z|.
    return 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)


@triton.jit
def _act_fwd(v, act):
    """Activation `act` (run-time code): 0 identity, 1 relu, 2 gelu (erf), 3 gelu (tanh), 4 silu, 5 relu6,
    6 hardswish (PyTorch's formulas and order; NaN stays NaN)."""
    if act == 1:
        r = tl.where(v < 0.0, 0.0, v)  # NaN stays NaN, as in PyTorch
    elif act == 2:
        r = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    elif act == 3:
        r = 0.5 * v * (1.0 + _tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)))
    elif act == 4:
        r = v / (1.0 + tl.exp(-v))
    elif act == 5:
        r = tl.where(v <= 0.0, 0.0, tl.where(v >= 6.0, 6.0, v))
    elif act == 6:
        t = v + 3.0
        t = tl.where(t < 0.0, 0.0, t)
        t = tl.where(6.0 < t, 6.0, t)
        r = v * t / 6.0
    else:
        r = v
    return r


@triton.jit
def _act_grad(v, act):
    """d act(v) / dv as PyTorch's backward formulas (relu'(0) = 0; relu6' and hardswish' at NaN: 1)."""
    if act == 1:
        r = tl.where(v > 0.0, 1.0, 0.0)
    elif act == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(v * 0.7071067811865476))
        r = cdf + v * (tl.exp(-0.5 * v * v) * 0.3989422804014327)
    elif act == 3:
        k0 = 0.7978845608028654
        k1 = 0.044715
        th = _tanh(k0 * (v + k1 * v * v * v))
        r = 0.5 * (1.0 + th) + 0.5 * v * (1.0 - th * th) * k0 * (1.0 + 3.0 * k1 * v * v)
    elif act == 4:
        s = 1.0 / (1.0 + tl.exp(-v))
        r = s * (1.0 + v * (1.0 - s))
    elif act == 5:
        r = tl.where((v <= 0.0) | (v >= 6.0), 0.0, 1.0)
    elif act == 6:
        r = tl.where(v <= -3.0, 0.0, tl.where(v < 3.0, v / 3.0 + 0.5, 1.0))
    else:
        r = v * 0.0 + 1.0
    return r
