"""Compile every Triton kernel launch that mergecore makes for a GPU architecture, on a machine
without a GPU, and report each compiled kernel's registers, spills and shared memory.

The interpreter (``TRITON_INTERPRET=1``), which the CPU test suite runs the Triton kernels in,
executes kernel bodies as numpy code: it never type-checks them the way Triton's compiler does,
never lowers them to PTX and never assembles them with ptxas. A kernel that passes every
interpreter test may still fail to compile, or need more registers or shared memory than the
GPU has, or spill registers to the stack. This module closes that gap without a GPU, in two processes:

1. *record* (under the interpreter): run every merge operation of the Triton backend on small
   CPU tensors (every dtype, single and batched launches, aligned and unaligned views, both
   selection strategies) and record each kernel launch's specialization: the kernel, each
   argument's Triton type (pointer dtype, or int/float with the compiler's value
   specialization), its 16-byte alignment, and the constexpr and launch options.
2. *compile* (no interpreter): for each distinct specialization, rebuild arguments with the same
   types and alignments and call the kernel's ``warmup``, which runs Triton's full pipeline
   (TTIR, TTGIR, LLVM IR, PTX, cubin through ptxas) for the target, here a stand-in driver
   that names the architecture, and launches nothing. ``cuobjdump`` (shipped with Triton) then
   reads the cubin's registers, stack (spills) and shared memory per kernel, and the PTX
   tells whether global loads and stores were vectorized to 128 bits.

Usage: ``python -m mergecore.testing.triton_compile [--arch 90] [--json FILE] [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

# H100 (sm_90) limits a kernel must stay within to launch at all.
MAX_REGISTERS = 255
MAX_SHARED_BYTES = 227 * 1024


@dataclass(frozen=True)
class Launch:
    """One kernel specialization: what Triton's compiler sees of a launch."""

    module: str
    kernel: str
    # per positional argument: ("ptr", dtype, aligned16) | ("int", v) | ("bool", v) | ("float", v)
    args: tuple
    options: tuple  # sorted (name, value) of constexprs and launch options (num_warps, ...)

    def key(self) -> str:
        return json.dumps([self.module, self.kernel, self.args, self.options])

    def label(self) -> str:
        dtypes = sorted({a[1] for a in self.args if a[0] == "ptr" and a[1] != "int64"})
        consts = ",".join(f"{k}={v}" for k, v in self.options
                          if k not in ("num_warps", "enable_fp_fusion"))
        return f"{self.kernel}[{'/'.join(dtypes) or '-'}]({consts})"


@dataclass
class Compiled:
    """Resource usage of one compiled launch (``error`` set when it did not compile)."""

    label: str
    arch: int
    registers: int | None = None
    stack_bytes: int | None = None  # per thread: register spills and local arrays
    shared_bytes: int | None = None
    # 128-bit global loads / stores in the PTX: how the compiler vectorized memory access
    vector_loads: int | None = None
    vector_stores: int | None = None
    seconds: float = 0.0
    error: str | None = None


# ----------------------------------------------------------------------------- recording


def _int_class(value: int) -> int:
    """A stand-in with the same compiler specialization as ``value``: Triton specializes an int
    argument on its width (i32 or i64), on being 1, and on being a multiple of 16."""
    wide = not -(1 << 31) <= value < (1 << 31)
    if value == 1:
        return 1
    step = 16 if value % 16 == 0 else 3
    return (1 << 40) + step if wide else step


def _describe_arg(value) -> tuple:
    import torch

    if isinstance(value, torch.Tensor):
        return ("ptr", str(value.dtype).removeprefix("torch."), value.data_ptr() % 16 == 0)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int):
        return ("int", _int_class(value))
    if isinstance(value, float):
        return ("float", 0.5)
    raise TypeError(f"unexpected kernel argument of type {type(value).__name__}")


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Record every interpreted kernel launch (the kernels still run) into the yielded list."""
    from triton.runtime.interpreter import InterpretedFunction

    launches: list[Launch] = []
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(
            module=self.fn.__module__, kernel=self.fn.__name__,
            args=tuple(_describe_arg(a) for a in args),
            options=tuple(sorted(kwargs.items())),
        ))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        yield launches
    finally:
        InterpretedFunction.run = original


def _workload(quick: bool) -> None:
    """Every merge operation through the Triton backend on small CPU tensors."""
    import torch

    import mergecore
    from triton_kernels import _config

    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float16, torch.float32]
    g = torch.Generator().manual_seed(0)

    def models(n: int, dtype, count: int, offset: int = 0):
        # offset > 0: views that start one element into a buffer (not 16-byte aligned)
        base = torch.randn(n + offset, generator=g).to(dtype)[offset:]
        xs = [(base.float() + 0.05 * torch.randn(n + offset, generator=g)[offset:]).to(dtype)
              for _ in range(count)]
        return base, xs

    strategies = ["auto"] if quick else ["auto", "radix"]
    for dtype in dtypes:
        for count in (2, 3):
            for offset in (0, 1):
                base, xs = models(3001, dtype, count, offset)
                w = [0.6, 0.4, 0.3][:count]
                d = [0.5, 0.3, 0.7][:count]
                mergecore.linear(xs, w)
                mergecore.task_arithmetic(base, xs, w)
                mergecore.dare_linear(base, xs, w, d, seed=1)
                mergecore.dare_ties(base, xs, w, d, seed=1)
                for strategy in strategies:
                    _config.SELECT_STRATEGY = strategy
                    mergecore.ties(base, xs, w, d)
                    mergecore.ties(base, xs, w, d, rescale=True)
                    mergecore.breadcrumbs(base, xs, w, d, gammas=0.01)
                    mergecore.breadcrumbs_ties(base, xs, w, d, gammas=0.01)
                _config.SELECT_STRATEGY = "auto"
            a, b = models(3001, dtype, 1)
            mergecore.slerp(a, b[0], 0.3)
        # batched forms: one launch over several tensors of mixed sizes (MULTI programs)
        pairs = [models(n, dtype, 2) for n in (7, 1009, 4099)]
        mergecore.batched("ties", [p[0] for p in pairs], [p[1] for p in pairs],
                          weights=[0.5, 0.5], densities=[0.4, 0.4])
        mergecore.batched("dare_ties", [p[0] for p in pairs], [p[1] for p in pairs],
                          weights=[0.5, 0.5], densities=[0.4, 0.4], seed=3)
        mergecore.slerp_batched([p[0] for p in pairs], [p[1][0] for p in pairs], 0.4)
        # an output dtype other than the inputs'
        base, xs = models(3001, dtype, 2)
        other = torch.float32 if dtype != torch.float32 else torch.bfloat16
        mergecore.ties(base, xs, [0.5, 0.5], [0.5, 0.5], out_dtype=other)
        mergecore.slerp(base, xs[0], 0.5, out_dtype=other)


def record(quick: bool) -> list[Launch]:
    """Run the workload under the interpreter (this process must have ``TRITON_INTERPRET=1``
    and ``MERGECORE_BACKEND=triton`` set before importing triton / mergecore)."""
    with recording() as launches:
        _workload(quick)
    unique: dict[str, Launch] = {}
    for launch in launches:
        unique.setdefault(launch.key(), launch)
    return list(unique.values())


# ----------------------------------------------------------------------------- compiling


class _TargetOnlyDriver:
    """Stands in for Triton's CUDA driver where there is no GPU: names the target only."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")


def _rebuild_arg(desc: list):
    import torch

    kind = desc[0]
    if kind == "ptr":
        dtype = getattr(torch, desc[1])
        buf = torch.empty(64, dtype=dtype)
        if buf.data_ptr() % 16:
            raise RuntimeError("torch.empty returned an unaligned buffer")
        return buf if desc[2] else buf[1:]
    if kind == "bool":
        return bool(desc[1])
    if kind == "int":
        return int(desc[1])
    return float(desc[1])


_VECTOR_LOAD = re.compile(r"\bld\.global[\w.:]*?\.v4\.[bfu]32\b")
_VECTOR_STORE = re.compile(r"\bst\.global[\w.:]*?\.v4\.[bfu]32\b")
_RESOURCE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def cuobjdump_path() -> str:
    """The cuobjdump Triton ships (or the one ``TRITON_CUOBJDUMP_PATH`` names)."""
    from triton import knobs

    return knobs.nvidia.cuobjdump.path


def _resources(cubin: bytes) -> tuple[int, int, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump_path(), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    match = _RESOURCE.search(out)
    if match is None:
        raise RuntimeError(f"no resource usage in cuobjdump output: {out!r}")
    regs, stack, shared, local = map(int, match.groups())
    return regs, max(stack, local), shared


def compile_launches(launches: list[dict], arch: int) -> list[Compiled]:
    """Compile each recorded launch for ``sm_<arch>`` (this process must not interpret)."""
    from triton.runtime.driver import driver

    previous = getattr(driver, "_active", None)  # None: no driver chosen yet (no GPU here)
    driver.set_active(_TargetOnlyDriver(arch))
    try:
        results = []
        cleared: set[int] = set()
        for raw in launches:
            launch = Launch(raw["module"], raw["kernel"], tuple(map(tuple, raw["args"])),
                            tuple(map(tuple, raw["options"])))
            kernel = getattr(importlib.import_module(launch.module), launch.kernel)
            if id(kernel) not in cleared:
                # a JITFunction keeps its compiled variants per device index, not per target:
                # forget those of an earlier arch
                kernel.device_caches.clear()
                cleared.add(id(kernel))
            args = [_rebuild_arg(list(a)) for a in launch.args]
            options = dict(launch.options)
            result = Compiled(label=launch.label(), arch=arch)
            start = time.perf_counter()
            try:
                compiled = kernel.warmup(*args, grid=(1,), **options)
                regs, stack, shared = _resources(compiled.asm["cubin"])
                result.registers, result.stack_bytes = regs, stack
                result.shared_bytes = max(shared, int(compiled.metadata.shared))
                ptx = compiled.asm["ptx"]
                result.vector_loads = len(_VECTOR_LOAD.findall(ptx))
                result.vector_stores = len(_VECTOR_STORE.findall(ptx))
            except Exception as exc:  # noqa: BLE001 - every failure is reported, not raised
                result.error = f"{type(exc).__name__}: {exc}"[:2000]
            result.seconds = time.perf_counter() - start
            results.append(result)
        return results
    finally:
        driver._active = previous


def problems(results: list[Compiled]) -> list[str]:
    """What would stop a kernel from compiling or launching on the target: one line each."""
    out = []
    for r in results:
        if r.error:
            out.append(f"{r.label} sm_{r.arch}: did not compile: {r.error}")
            continue
        if r.registers > MAX_REGISTERS:
            out.append(f"{r.label} sm_{r.arch}: {r.registers} registers > {MAX_REGISTERS}")
        if r.shared_bytes > MAX_SHARED_BYTES:
            out.append(f"{r.label} sm_{r.arch}: {r.shared_bytes} bytes of shared memory")
    return out


def table(results: list[Compiled]) -> str:
    """The compile results as a text table (registers, spills, vector loads per kernel)."""
    width = max((len(r.label) for r in results), default=10)
    lines = [f"{'kernel specialization':<{width}}  arch  regs  stack  shared  ld128  st128  seconds"]
    for r in results:
        if r.error:
            lines.append(f"{r.label:<{width}}  {r.arch:>4}  FAILED: {r.error.splitlines()[0]}")
        else:
            lines.append(f"{r.label:<{width}}  {r.arch:>4}  {r.registers:>4}  {r.stack_bytes:>5}"
                         f"  {r.shared_bytes:>6}  {r.vector_loads:>5}  {r.vector_stores:>5}"
                         f"  {r.seconds:>7.1f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def _record_in_subprocess(quick: bool) -> list[dict]:
    env = dict(os.environ, TRITON_INTERPRET="1", MERGECORE_BACKEND="triton")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "launches.json"
        cmd = [sys.executable, "-m", "mergecore.testing.triton_compile", "--record", str(path)]
        if quick:
            cmd.append("--quick")
        subprocess.run(cmd, env=env, check=True)
        return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    """Command line: compile the kernels for the given architectures and print the table."""
    parser = argparse.ArgumentParser(prog="python -m mergecore.testing.triton_compile",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append",
                        help="CUDA compute capability as an int (90 = H100); repeatable")
    parser.add_argument("--quick", action="store_true", help="bf16 and the auto strategy only")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--record", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.record is not None:
        launches = record(args.quick)
        args.record.write_text(json.dumps([asdict(launch) for launch in launches]))
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("compiling needs TRITON_INTERPRET unset (the recording step sets it)")
    launches = _record_in_subprocess(args.quick)
    results = []
    for arch in args.arch or [90]:
        results += compile_launches(launches, arch)
    print(table(results))
    issues = problems(results)
    for line in issues:
        print("PROBLEM:", line)
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n")
    return 1 if issues else 0


if __name__ == "__main__":
    sys.exit(main())
