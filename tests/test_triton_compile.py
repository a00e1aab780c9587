"""Every Triton kernel launch compiles for an H100 (sm_90), on a machine without a GPU.

The rest of the suite runs the Triton kernels in the interpreter, which never compiles them.
Here ``mergecore.testing.triton_compile`` records the launches of every merge operation (bf16,
the quick workload) and compiles each through Triton's full pipeline down to a cubin, then
checks registers and shared memory against the GPU's limits, and that the streaming kernels'
aligned variants load and store in 128-bit accesses. No GPU is needed: only Triton's
compiler and the ptxas / cuobjdump it ships.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mergecore.testing import triton_compile as tc

ROOT = Path(__file__).resolve().parent.parent
STREAMING = {"_lerp_kernel", "_reduce_kernel", "_combine_kernel", "_l1_kernel"}
STREAMING_STORES = {"_lerp_kernel", "_combine_kernel"}  # the others store per-program sums


def _toolchain_missing() -> str | None:
    try:
        import triton  # noqa: F401
        from triton import knobs
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    try:
        knobs.nvidia.cuobjdump.path  # noqa: B018 - raises when the tool is absent
        knobs.nvidia.ptxas_blackwell.path  # noqa: B018
    except Exception as exc:  # noqa: BLE001
        return f"Triton's NVIDIA tools are missing ({exc})"
    return None


requires_toolchain = pytest.mark.skipif(_toolchain_missing() is not None,
                                        reason=str(_toolchain_missing()))


def _compile_env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the suite's conftest sets it; compiling needs it unset
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _launch_kernels() -> set[str]:
    """Every kernel entry point of triton_kernels (the ``@triton.jit def _..._kernel``)."""
    names = set()
    for path in (ROOT / "triton_kernels").glob("*.py"):
        names |= set(re.findall(r"@triton\.jit\s+def (_\w+_kernel)\(", path.read_text()))
    return names


@requires_toolchain
def test_every_kernel_compiles_for_sm90(tmp_path):
    out = tmp_path / "sm90.json"
    proc = subprocess.run(
        [sys.executable, "-m", "mergecore.testing.triton_compile", "--quick", "--arch", "90",
         "--json", str(out)],
        check=False, env=_compile_env(), cwd=ROOT, capture_output=True, text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    results = json.loads(out.read_text())
    compiled = {r["label"].split("[")[0] for r in results}
    expected = _launch_kernels()
    assert len(expected) >= 10
    assert compiled == expected, f"kernels the workload never launched: {expected - compiled}"
    for r in results:
        assert r["error"] is None
        assert 0 < r["registers"] <= tc.MAX_REGISTERS, r
        assert r["shared_bytes"] <= tc.MAX_SHARED_BYTES, r
        # the streaming kernels' aligned variants must move memory in 128-bit accesses (the
        # launcher's alignment hint reached the loads); they are bound by memory bandwidth
        kernel = r["label"].split("[")[0]
        if kernel in STREAMING and "ALIGNED=True" in r["label"]:
            assert r["vector_loads"] > 0, r
            if kernel in STREAMING_STORES:
                assert r["vector_stores"] > 0, r


@requires_toolchain
def test_a_kernel_that_does_not_compile_is_reported(tmp_path):
    # A kernel the interpreter runs (numpy broadcasts a 3-lane arange) but the compiler
    # rejects: tl.arange needs a power-of-two length.
    (tmp_path / "broken_kernels.py").write_text(
        "import triton\nimport triton.language as tl\n\n\n"
        "@triton.jit\ndef _odd_kernel(ptr, BLOCK: tl.constexpr):\n"
        "    tl.store(ptr + tl.arange(0, BLOCK), 1.0)\n"
    )
    launch = {"module": "broken_kernels", "kernel": "_odd_kernel",
              "args": [["ptr", "float32", True]],
              "options": [["BLOCK", 3], ["num_warps", 1]]}
    script = (
        "import json, sys\n"
        "from mergecore.testing import triton_compile as tc\n"
        f"r = tc.compile_launches([json.loads({json.dumps(json.dumps(launch))})], 90)\n"
        "print(json.dumps([x.error for x in r]))\n"
        "print(json.dumps(tc.problems(r)))\n"
    )
    env = _compile_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    proc = subprocess.run([sys.executable, "-c", script], check=False, env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    errors, problems = (json.loads(line) for line in proc.stdout.strip().splitlines()[-2:])
    assert errors[0] and "power of 2" in errors[0].lower().replace("power-of-two", "power of 2")
    assert len(problems) == 1 and problems[0].startswith("_odd_kernel[float32](BLOCK=3) sm_90")


def test_limits_are_reported():
    ok = tc.Compiled(label="k_ok", arch=90, registers=128, stack_bytes=16, shared_bytes=1024)
    regs = tc.Compiled(label="k_regs", arch=90, registers=256, stack_bytes=0, shared_bytes=0)
    smem = tc.Compiled(label="k_smem", arch=90, registers=32, stack_bytes=0,
                       shared_bytes=tc.MAX_SHARED_BYTES + 1)
    assert tc.problems([ok]) == []
    assert [p.split(":")[0] for p in tc.problems([regs, smem])] == ["k_regs sm_90",
                                                                     "k_smem sm_90"]


def test_int_arguments_keep_their_compiler_specialization():
    # Triton specializes an int on its width, on == 1 and on divisibility by 16
    assert tc._int_class(1) == 1
    assert tc._int_class(4096) % 16 == 0 and tc._int_class(4096) < (1 << 31)
    assert tc._int_class(4099) % 16 != 0 and tc._int_class(4099) < (1 << 31)
    assert tc._int_class(1 << 33) >= (1 << 31) and tc._int_class(1 << 33) % 16 == 0
    assert tc._int_class((1 << 33) + 5) >= (1 << 31) and tc._int_class((1 << 33) + 5) % 16 != 0
