"""Every tuning knob of the Triton kernels, in one place.

Launchers read these attributes at call time (``_config.X``, never ``from _config import X``),
so a test or a benchmark may set them before a call. Block sizes are powers of two; a block is
the number of elements one program handles per tile.
"""

from __future__ import annotations

# No fused multiply-add contraction: every product and sum is rounded on its own, as in the C++
# kernels (-ffp-contract=off) and in Triton's interpreter, so the compiled kernels give the
# bits the CPU tests checked (a contracted w*d + s can flip a TIES sign election where the sum
# is near zero). The memory-bound kernels lose nothing measurable by it.
FP_FUSION = False

# Elementwise kernels. lerp2 (slerp's second pass) needs few registers; the fused combine
# keeps several fp32 accumulators per element, so it runs smaller tiles to keep more warps
# resident (H100: 4096 elements / 8 warps used 233 registers per thread -> 8 warps per SM).
LERP_BLOCK = 4096
LERP_WARPS = 8
COMBINE_BLOCK = 1024
COMBINE_WARPS = 4

# Whole-tensor reductions: slerp's sums and the masked L1 sums (one fp32 partial per tile).
REDUCE_BLOCK = 4096
REDUCE_WARPS = 8
L1_BLOCK = 2048  # the masked L1 may evaluate Philox masks: more registers, smaller tiles
L1_WARPS = 8

# Top-k selection.
SELECT_BLOCK = 2048  # tile of the scan pass; also the unit of the index-cutoff count
SELECT_WARPS = 8
DIGIT_BLOCK = 2048  # candidates per loop step of a digit-histogram pass
DIGIT_WARPS = 4
DIGIT_PROGRAMS_MAX = 264  # programs of a candidate digit / count pass, all selections
RADIX_PROGRAMS_MAX = 1056  # programs of a full-data (radix fallback) pass, all selections
RESOLVE_BLOCK = 4096  # tile counts scanned per step when locating the index cutoff
# The scan claims candidate space with one atomic add per tile; tiles are spread over up to
# SELECT_REGIONS_MAX counters (one per 128-byte line) so the claims do not serialize on one
# address (H100: one counter for 64K tiles cost ~1.4 ms, ~21 ns per atomic).
SELECT_REGIONS_MAX = 64  # at most 64 (the kernels read the counters as one 64-lane vector)
SELECT_TILES_PER_REGION = 32
SAMPLE_MAX = 65536  # most keys sampled per (base, model) pair to bound the threshold
SAMPLE_MIN_RATIO = 16  # sample at most n // 16 keys: the sample never is the whole tensor
SAMPLE_BLOCK = 1024
SAMPLE_Z = 5.0  # half-width of the candidate band, in binomial standard deviations
SAMPLE_SLACK = 4  # extra sample ranks on each side of the band
# Candidate buffer of a selection: CAP_FACTOR x the expected band + n / CAP_TIE_DIV + CAP_MIN
# (bf16 deltas tie a lot: a 2% band held 7.5% of 64M keys on an H100 run), or its share of
# CAND_BUDGET entries (8 bytes each) if larger, at most n.
CAP_FACTOR = 3.0
CAP_TIE_DIV = 8
CAP_MIN = 1 << 14
CAND_BUDGET = 1 << 25
# "auto": sampled bounds + candidate compaction, exact radix fallback when the bounds miss;
# "radix": always the full-data radix path (4 histogram passes over the key bytes).
SELECT_STRATEGY = "auto"
