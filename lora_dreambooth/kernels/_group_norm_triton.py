"""Triton kernels behind :mod:`lora_dreambooth.kernels.group_norm` (imported only where Triton is installed).

Every program handles one slice (at most ``BLOCK`` elements) of one group of one image of an NHWC tensor; the
element ``i`` of a group's slice space is channel ``g * D + i % D`` of spatial position ``i // D``. A group's
per-slice partials (``NSPLIT`` pairs) are read back ``CHUNK`` at a time, so one compiled variant of each kernel
serves every size: on first use a run compiles four kernels per dtype, not one per layer shape.
"""
import triton
import triton.language as tl

# Runtime sizes are not specialized on: Triton would otherwise compile a variant per divisibility pattern of
# the channel count and spatial size.
_SIZES = ["C", "D", "COUNT", "G", "NSPLIT"]
CHUNK = 64  # partials read at once


@triton.jit
def _slice(pid_ng, pid_s, C, D, COUNT, G, BLOCK: tl.constexpr):
    """Offsets (into the NHWC tensor) of this program's slice of group g of image n, its channels and mask."""
    n = pid_ng // G
    g = pid_ng % G
    idx = pid_s * BLOCK + tl.arange(0, BLOCK)
    mask = idx < COUNT
    row = idx // D
    chan = g * D + (idx - row * D)
    image = (COUNT // D) * C  # H*W*C
    return n.to(tl.int64) * image + row.to(tl.int64) * C + chan, chan, mask


@triton.jit
def _group_moments(partial, pid_ng, COUNT, NSPLIT, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """Mean and sum of squared deviations of a whole group from its slices' (mean, M2) (Chan et al.)."""
    total = tl.zeros([CHUNK], tl.float32)
    for start in range(0, NSPLIT, CHUNK):
        s = start + tl.arange(0, CHUNK)
        valid = s < NSPLIT
        m = tl.load(partial + (pid_ng * NSPLIT + s) * 2, mask=valid, other=0.0)
        total += m * tl.where(valid, tl.minimum(COUNT - s * BLOCK, BLOCK), 0).to(tl.float32)
    mean = tl.sum(total, 0) / COUNT
    total = tl.zeros([CHUNK], tl.float32)
    for start in range(0, NSPLIT, CHUNK):
        s = start + tl.arange(0, CHUNK)
        valid = s < NSPLIT
        m = tl.load(partial + (pid_ng * NSPLIT + s) * 2, mask=valid, other=0.0)
        m2 = tl.load(partial + (pid_ng * NSPLIT + s) * 2 + 1, mask=valid, other=0.0)
        count = tl.where(valid, tl.minimum(COUNT - s * BLOCK, BLOCK), 0).to(tl.float32)
        deviation = tl.where(valid, m - mean, 0.0)
        total += m2 + count * deviation * deviation
    return mean, tl.sum(total, 0)


@triton.jit
def _group_sums(partial, pid_ng, NSPLIT, CHUNK: tl.constexpr):
    """The sums of a group's per-slice (a, b) partials."""
    sum_a = tl.zeros([CHUNK], tl.float32)
    sum_b = tl.zeros([CHUNK], tl.float32)
    for start in range(0, NSPLIT, CHUNK):
        s = start + tl.arange(0, CHUNK)
        valid = s < NSPLIT
        sum_a += tl.load(partial + (pid_ng * NSPLIT + s) * 2, mask=valid, other=0.0)
        sum_b += tl.load(partial + (pid_ng * NSPLIT + s) * 2 + 1, mask=valid, other=0.0)
    return tl.sum(sum_a, 0), tl.sum(sum_b, 0)


@triton.jit(do_not_specialize=_SIZES)
def group_norm_moments(X, partial, C, D, COUNT, G, NSPLIT, BLOCK: tl.constexpr):
    """Each slice's mean and sum of squared deviations (exact: the slice is in registers)."""
    pid_ng, pid_s = tl.program_id(0), tl.program_id(1)
    offs, chan, mask = _slice(pid_ng, pid_s, C, D, COUNT, G, BLOCK)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.sum(x, 0) / tl.minimum(COUNT - pid_s * BLOCK, BLOCK).to(tl.float32)
    deviation = tl.where(mask, x - m, 0.0)
    tl.store(partial + (pid_ng * NSPLIT + pid_s) * 2, m)
    tl.store(partial + (pid_ng * NSPLIT + pid_s) * 2 + 1, tl.sum(deviation * deviation, 0))


@triton.jit(do_not_specialize=_SIZES + ["eps"])
def group_norm_apply(X, Y, W, B, partial, Mean, Rstd, C, D, COUNT, G, NSPLIT, eps, BLOCK: tl.constexpr,
                     CHUNK: tl.constexpr, SILU: tl.constexpr):
    """y = (x - mean) * rstd * w + b (then SiLU) over the slice; the first slice of a group records its stats."""
    pid_ng, pid_s = tl.program_id(0), tl.program_id(1)
    mean, m2 = _group_moments(partial, pid_ng, COUNT, NSPLIT, BLOCK, CHUNK)
    rstd = 1.0 / tl.sqrt(m2 / COUNT + eps)
    if pid_s == 0:
        tl.store(Mean + pid_ng, mean)
        tl.store(Rstd + pid_ng, rstd)
    offs, chan, mask = _slice(pid_ng, pid_s, C, D, COUNT, G, BLOCK)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + chan, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + chan, mask=mask, other=0.0).to(tl.float32)
    y = (x - mean) * rstd * w + b
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _upstream(GY, X, W, B, offs, chan, mask, mean, rstd, SILU: tl.constexpr):
    """The normalized input x^ and the gradient reaching it (through SiLU and the affine) at this slice."""
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    gy = tl.load(GY + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + chan, mask=mask, other=0.0).to(tl.float32)
    xhat = (x - mean) * rstd
    if SILU:
        z = xhat * w + tl.load(B + chan, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(z)
        gy = gy * sig * (1.0 + z * (1.0 - sig))
    return xhat, tl.where(mask, gy * w, 0.0)


@triton.jit(do_not_specialize=_SIZES)
def group_norm_grad_sums(GY, X, W, B, Mean, Rstd, partial, C, D, COUNT, G, NSPLIT, BLOCK: tl.constexpr,
                         SILU: tl.constexpr):
    """Each slice's sums of g and g * x^, where g is the gradient reaching x^."""
    pid_ng, pid_s = tl.program_id(0), tl.program_id(1)
    offs, chan, mask = _slice(pid_ng, pid_s, C, D, COUNT, G, BLOCK)
    xhat, g = _upstream(GY, X, W, B, offs, chan, mask, tl.load(Mean + pid_ng), tl.load(Rstd + pid_ng), SILU)
    tl.store(partial + (pid_ng * NSPLIT + pid_s) * 2, tl.sum(g, 0))
    tl.store(partial + (pid_ng * NSPLIT + pid_s) * 2 + 1, tl.sum(g * xhat, 0))


@triton.jit(do_not_specialize=_SIZES)
def group_norm_grad_input(GY, X, GX, W, B, Mean, Rstd, partial, C, D, COUNT, G, NSPLIT, BLOCK: tl.constexpr,
                          CHUNK: tl.constexpr, SILU: tl.constexpr):
    """dx = rstd * (g - mean(g) - x^ * mean(g * x^)), the means over the group."""
    pid_ng, pid_s = tl.program_id(0), tl.program_id(1)
    sum_g, sum_gx = _group_sums(partial, pid_ng, NSPLIT, CHUNK)
    rstd = tl.load(Rstd + pid_ng)
    offs, chan, mask = _slice(pid_ng, pid_s, C, D, COUNT, G, BLOCK)
    xhat, g = _upstream(GY, X, W, B, offs, chan, mask, tl.load(Mean + pid_ng), rstd, SILU)
    gx = rstd * (g - (sum_g + xhat * sum_gx) / COUNT)
    tl.store(GX + offs, gx.to(GX.dtype.element_ty), mask=mask)
