"""Triton kernels behind :mod:`lora_dreambooth.kernels.geglu` (imported only where Triton is installed).

``P`` is the (rows, 2F) output of GEGLU's projection: the first F columns are the values, the last F the gate.
Each program handles ``BLOCK`` elements of the (rows, F) output, in fp32, rounded once on store.
"""
import triton
import triton.language as tl

_SIZES = ["TOTAL", "F"]  # runtime sizes, not specialized on: one compiled variant per dtype
_SQRT1_2 = tl.constexpr(0.7071067811865476)  # a jitted function reads only constexpr globals
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _offsets(TOTAL, F, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < TOTAL
    row = idx // F
    value = row * 2 * F + (idx - row * F)  # the value's column; the gate is F further
    return idx, value, mask


@triton.jit(do_not_specialize=_SIZES)
def geglu_forward(P, Y, TOTAL, F, BLOCK: tl.constexpr):
    """y = value * gelu(gate), GELU exact (erf), as `F.gelu`'s default."""
    idx, value, mask = _offsets(TOTAL, F, BLOCK)
    h = tl.load(P + value, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(P + value + F, mask=mask, other=0.0).to(tl.float32)
    gelu = 0.5 * g * (1.0 + tl.math.erf(g * _SQRT1_2))
    tl.store(Y + idx, (h * gelu).to(Y.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_SIZES)
def geglu_backward(P, DY, DP, TOTAL, F, BLOCK: tl.constexpr):
    """d value = dy * gelu(gate); d gate = dy * value * gelu'(gate), written into one (rows, 2F) gradient."""
    idx, value, mask = _offsets(TOTAL, F, BLOCK)
    h = tl.load(P + value, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(P + value + F, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + idx, mask=mask, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.math.erf(g * _SQRT1_2))
    pdf = tl.exp(-0.5 * g * g) * _INV_SQRT_2PI
    tl.store(DP + value, (dy * g * cdf).to(DP.dtype.element_ty), mask=mask)
    tl.store(DP + value + F, (dy * h * (cdf + g * pdf)).to(DP.dtype.element_ty), mask=mask)
