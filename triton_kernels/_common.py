"""Helpers shared by the kernel families: loads that widen to fp32, rounding stores, keys.

Tensors reach the kernels as *element offsets relative to one reference tensor* per dtype
(``ref + offset`` addresses the tensor), so one launch serves many tensors without packing
them. ``ALIGNED`` kernels may assume every offset is a multiple of 16 elements, which lets
the compiler emit 16-byte vector loads for the unmasked (full-tile) path.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_f32(ptr, offs, valid, MASKED: tl.constexpr):
    """Load ``ptr[offs]`` widened to fp32; masked lanes (``~valid``) read as 0."""
    if MASKED:
        v = tl.load(ptr + offs, mask=valid, other=0.0)
    else:
        v = tl.load(ptr + offs)
    return v.to(tl.float32)


@triton.jit
def round_to(val, DTYPE: tl.constexpr):
    """Round fp32 ``val`` once to ``DTYPE`` with round-to-nearest-even.

    bf16 is rounded with integer arithmetic (``bits + 0x7FFF + lsb``, NaN kept quiet) so the
    interpreter, whose bf16 cast truncates, produces the same bits as the GPU.
    """
    if DTYPE == tl.bfloat16:
        bits = val.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        quiet = (bits >> 16) | 0x40
        hi = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, quiet, rounded)
        return hi.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif DTYPE == tl.float16:
        return val.to(tl.float16)
    else:
        return val


@triton.jit
def store_rounded(ptr, offs, val, valid, MASKED: tl.constexpr):
    """Store fp32 ``val`` rounded once to the element type of ``ptr``."""
    out = round_to(val, ptr.dtype.element_ty)
    if MASKED:
        tl.store(ptr + offs, out, mask=valid)
    else:
        tl.store(ptr + offs, out)


@triton.jit
def abs_key(d):
    """Selection key: the bits of ``|d|`` (fp32) as a non-negative int32."""
    return d.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def f32_from_bits(bits):
    """The fp32 whose bit pattern is the low 32 bits of the integer ``bits``."""
    return bits.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def job_and_tile(prog_job, prog_tile, MULTI: tl.constexpr):
    """(job, tile) of this program: from the program table, or (0, pid) for one job."""
    pid = tl.program_id(0)
    if MULTI:
        job = tl.load(prog_job + pid)
        tile = tl.load(prog_tile + pid)
    else:
        job = pid.to(tl.int64) * 0
        tile = pid.to(tl.int64)
    return job, tile


@triton.jit
def load_offset(ptr, ALIGNED: tl.constexpr):
    """Load a tensor offset from a table; ``ALIGNED``: the launcher checked it is a multiple
    of 16 elements (the hint must sit on the load itself to survive inlining)."""
    off = tl.load(ptr)
    if ALIGNED:
        off = tl.multiple_of(off, 16)
    return off
