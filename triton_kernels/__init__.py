"""Triton GPU kernels of mergecore, one module per operation family.

- ``slerp``: whole-tensor reduction ``(sum a*a, sum b*b, sum a*b)`` and the lerp pass.
- ``combine``: the fused linear / task-arithmetic / TIES / DARE / breadcrumbs combine.
- ``select``: exact top-k selection (``TopSet``) by sampled bounds + candidate radix select,
  with a full-data radix fallback; never sorts the tensor.
- ``dare``: Philox4x32-10 keep masks (bit-identical to ``mergecore.rng``) and masked L1 sums.
- ``_config``: every block size, warp count and tuning knob.

Importing this package (or any module of it) compiles nothing and does not touch CUDA:
kernels compile on their first launch. On CPU tensors they run under ``TRITON_INTERPRET=1``.
The launch functions take flat, contiguous torch tensors; ``mergecore.backends.triton``
adapts them to the primitive contract of ``mergecore.backends.spec``.
"""
