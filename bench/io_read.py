"""Read throughput of a safetensors checkpoint: safetensors.safe_open vs mergecore's TensorReader.

    python -m bench.io_read [--size 1.5GB] [--dir /path/on/the/disk/to/test] [--repeats 2]

Writes a checkpoint of LLM-like bf16 tensors with mergecore's StreamingWriter (timed too),
then reads every tensor back, cold (the file's pages dropped from the page cache with
POSIX_FADV_DONTNEED before each run; the resident fraction, from ``mincore``, is shown)
and warm (file fully cached). GB/s = tensor bytes / wall seconds, median of the repeats; every method touches each page of
each tensor it returns (safe_open's tensors may be lazily mapped).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import safetensors
import torch

from mergecore.benchmark.roofs import drop_page_cache, resident_fraction
from mergecore.io.checkpoint import open_checkpoint
from mergecore.io.reader import TensorReader, native_pread
from mergecore.io.writer import StreamingWriter, plan_shards
from mergecore.units import parse_size


def _layer(i: int, h: int, f: int) -> list[tuple[str, tuple[int, ...]]]:
    p = f"model.layers.{i}."
    return [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (h // 4, h)), (p + "self_attn.v_proj.weight", (h // 4, h)),
            (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
            (p + "mlp.down_proj.weight", (h, f))]


def make_checkpoint(directory: Path, total_bytes: int) -> tuple[float, int]:
    """An LLM-shaped bf16 checkpoint of about ``total_bytes``; returns (write seconds, bytes)."""
    h, f = 2048, 5632
    per_layer = 2 * (2 * h + 2 * h * h + 2 * (h // 4) * h + 3 * f * h)
    layers = max(1, round(total_bytes / per_layer))
    shapes = [s for i in range(layers) for s in _layer(i, h, f)] + [("model.norm.weight", (h,))]
    plan = plan_shards([(n, "BF16", s) for n, s in shapes], 1 << 30)
    gen = torch.Generator().manual_seed(0)
    elapsed = 0.0
    writer = StreamingWriter(directory, plan)
    for name, shape in shapes:
        t = torch.randn(shape, generator=gen, dtype=torch.bfloat16)  # not timed
        start = time.perf_counter()
        writer.write(name, t)
        elapsed += time.perf_counter() - start
    start = time.perf_counter()
    writer.finalize()
    elapsed += time.perf_counter() - start
    return elapsed, plan.total_size


def touch(t: torch.Tensor) -> None:
    """Fault in every page of ``t`` (an mmap-backed tensor is otherwise read lazily)."""
    flat = t.reshape(-1).view(torch.uint8)
    if flat.numel():
        flat[::4096].sum()


def resident(files: list[Path]) -> str:
    share = resident_fraction(files)
    return "?" if share is None else f"{100 * share:.0f}%"


def run(args: argparse.Namespace) -> None:
    base = Path(args.dir) if args.dir else None
    tmp = Path(tempfile.mkdtemp(prefix="mergecore-io-bench-", dir=base))
    try:
        write_s, nbytes = make_checkpoint(tmp, parse_size(args.size))
        ckpt = open_checkpoint(tmp)
        infos = list(ckpt.tensors.values())
        files = ckpt.weight_files
        largest = max(i.nbytes for i in infos)
        print(f"checkpoint: {len(infos)} tensors, {nbytes / 1e9:.2f} GB in {len(files)} files "
              f"at {tmp}")
        print(f"write (StreamingWriter, in order, sha256 + fsync): {nbytes / write_s / 1e9:.2f} GB/s")

        def safe_open_all() -> None:
            by_file: dict[Path, list[str]] = {}
            for i in infos:
                by_file.setdefault(i.file, []).append(i.name)
            for path, names in by_file.items():
                with safetensors.safe_open(path, "pt") as fh:
                    for n in names:
                        touch(fh.get_tensor(n))

        def reader_fresh(**kw) -> Callable[[], None]:
            def go() -> None:
                with TensorReader(**kw) as r:
                    for i in infos:
                        touch(r.read_tensor(i))
            return go

        staging = torch.empty(largest, dtype=torch.uint8)
        staging.fill_(0)  # touch the pages once

        def reader_reuse(**kw) -> Callable[[], None]:
            def go() -> None:
                with TensorReader(**kw) as r:
                    for i in infos:
                        r.read_into(i, staging)
                        touch(staging[: i.nbytes])
            return go

        methods: list[tuple[str, Callable[[], None]]] = [
            ("safetensors.safe_open get_tensor", safe_open_all),
            ("TensorReader python, 1 thread, new tensors", reader_fresh(nthreads=1,
                                                                         use_native=False)),
            ("TensorReader python, 4 threads, new tensors", reader_fresh(nthreads=4,
                                                                          use_native=False)),
            ("TensorReader python, 4 threads, reused buffer", reader_reuse(nthreads=4,
                                                                            use_native=False)),
            ("TensorReader python, reused buffer, drop_cache", reader_reuse(
                nthreads=4, use_native=False, drop_cache=True)),
        ]
        if native_pread() is not None:
            methods += [
                ("TensorReader native, 4 threads, new tensors", reader_fresh(nthreads=4,
                                                                              use_native=True)),
                ("TensorReader native, 4 threads, reused buffer", reader_reuse(
                    nthreads=4, use_native=True)),
            ]
        print(f"{'method':50s} {'cold GB/s':>10s} {'(cached before)':>16s} {'warm GB/s':>10s}")
        for label, fn in methods:
            cold, res = [], []
            for _ in range(args.repeats):
                drop_page_cache(files)
                res.append(resident(files))
                t = time.perf_counter()
                fn()
                cold.append(time.perf_counter() - t)
            fn()  # now the file is cached (unless the method drops it)
            warm = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                fn()
                warm.append(time.perf_counter() - t)
            print(f"{label:50s} {nbytes / statistics.median(cold) / 1e9:10.2f} "
                  f"{'/'.join(res):>16s} {nbytes / statistics.median(warm) / 1e9:10.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1.5GB", help="checkpoint size (default 1.5GB)")
    p.add_argument("--dir", default=None, help="where to create it (default: $TMPDIR)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--keep", action="store_true", help="keep the checkpoint")
    run(p.parse_args())


if __name__ == "__main__":
    main()
