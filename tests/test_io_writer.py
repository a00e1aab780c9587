"""The streaming safetensors writer: layout, sharding (as mergekit), crash safety, errors."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from mergecore.io.checkpoint import open_checkpoint
from mergecore.io.errors import OutputFileError, TensorWriteError
from mergecore.io.reader import TensorReader
from mergecore.io.safetensors_format import read_header
from mergecore.io.types import SAFETENSORS_DTYPES, TORCH_TO_SAFETENSORS
from mergecore.io.writer import (
    MANIFEST_NAME,
    StreamingWriter,
    plan_shards,
    write_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]


def _random(code: str, shape, gen) -> torch.Tensor:
    dtype, itemsize = SAFETENSORS_DTYPES[code]
    n = 1
    for s in shape:
        n *= s
    raw = torch.randint(1, 256, (n * itemsize,), dtype=torch.uint8, generator=gen)
    if code == "BOOL":
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _entries(tensors: dict[str, torch.Tensor]):
    return [(n, TORCH_TO_SAFETENSORS[t.dtype], tuple(t.shape)) for n, t in tensors.items()]


def _model(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(), (1,), (0,), (7,), (13, 17), (5, 123, 123), (127,), (3, 0, 2), (64, 31)]
    codes = ["F32", "BF16", "F16", "F64", "I64", "I8", "BOOL", "F8_E5M2"]
    return {f"t{i}.{code}": _random(code, shape, gen)
            for i, shape in enumerate(shapes) for code in codes}


def _final_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if not p.name.startswith("."))


# ------------------------------------------------------------------------------------------------
# plan_shards: the same cut and names as mergekit 0.1.5's TensorWriter
# ------------------------------------------------------------------------------------------------
def _mergekit_layout(tmp: Path, tensors: dict[str, torch.Tensor], max_shard: int):
    mergekit_writer = pytest.importorskip("mergekit.io.tensor_writer")

    writer = mergekit_writer.TensorWriter(str(tmp), max_shard_size=max_shard, safe_serialization=True)
    for name, t in tensors.items():
        writer.save_tensor(name, t)
    writer.finalize()
    files = sorted(p.name for p in tmp.iterdir())
    index = None
    if "model.safetensors.index.json" in files:
        index = json.loads((tmp / "model.safetensors.index.json").read_text())
    groups = {f: sorted(read_header(tmp / f)[0]) for f in files if f.endswith(".safetensors")}
    return files, index, groups


SIZE_CASES = {
    "one shard": ([10, 20, 30], 1000),
    "exact fit": ([25, 25, 25, 25, 25], 50),
    "one over": ([25, 26, 25, 24, 1], 50),
    "huge first": ([500, 1, 2], 100),
    "huge middle": ([30, 30, 500, 30, 30], 100),
    "all huge": ([200, 300, 400], 100),
    "no limit": ([200, 300, 400], 0),
    "many": ([7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47] * 3, 60),
    "with empty": ([30, 0, 30, 0, 0, 41, 0], 60),
}


@pytest.mark.parametrize("case", sorted(SIZE_CASES))
def test_shard_plan_matches_mergekit(tmp_path, case):
    sizes, limit = SIZE_CASES[case]
    gen = torch.Generator().manual_seed(len(sizes))
    tensors = {f"model.layers.{i}.w": _random("F32", (n,), gen) for i, n in enumerate(sizes)}
    files, index, groups = _mergekit_layout(tmp_path / "mk", tensors, limit * 4)

    plan = plan_shards(_entries(tensors), limit * 4)
    ours = [s.filename for s in plan.shards]
    assert sorted(ours + ([plan.index_filename] if plan.index_filename else [])) == files
    assert {s.filename: sorted(n for n, _, _ in s.entries) for s in plan.shards} == groups
    assert plan.total_size == 4 * sum(sizes)
    if index is None:
        assert plan.index_filename is None and len(plan.shards) == 1
    else:
        assert plan.weight_map == index["weight_map"]
        assert plan.index_json()["metadata"]["total_size"] == index["metadata"]["total_size"]

    # and the writer produces those files, which hold the same tensors as mergekit's
    out = tmp_path / "mc"
    write_checkpoint(out, tensors.items(), limit * 4)
    assert _final_files(out) == sorted(files)
    for f, names in groups.items():
        assert sorted(read_header(out / f)[0]) == names
        ours = safetensors.torch.load_file(out / f)
        theirs = safetensors.torch.load_file(tmp_path / "mk" / f)
        assert all(_bytes(ours[n]) == _bytes(theirs[n]) for n in names)


def test_shard_names_and_index_format(tmp_path):
    tensors = {f"w{i}": torch.full((10,), float(i + 1)) for i in range(12)}
    plan = plan_shards(_entries(tensors), 100)
    assert [s.filename for s in plan.shards] == [
        f"model-{i:05d}-of-00006.safetensors" for i in range(1, 7)]
    assert plan.index_filename == "model.safetensors.index.json"
    write_checkpoint(tmp_path, tensors.items(), 100)
    index = json.loads((tmp_path / plan.index_filename).read_text())
    assert index["metadata"]["total_size"] == 12 * 40
    assert "mergecore_version" in index["metadata"]
    assert index["weight_map"] == {f"w{i}": plan.shards[i // 2].filename for i in range(12)}
    assert plan_shards([], 100).shards == []
    with pytest.raises(ValueError, match="twice"):
        plan_shards([("a", "F32", (1,)), ("a", "F32", (1,))], None)


# ------------------------------------------------------------------------------------------------
# content: byte-identical to safetensors, in any write order
# ------------------------------------------------------------------------------------------------
def test_single_file_is_byte_identical_to_safetensors(tmp_path):
    tensors = _model(1)
    ref = tmp_path / "ref.safetensors"
    safetensors.torch.save_file(tensors, ref, metadata={"format": "pt"})
    order = list(read_header(ref)[0])  # the package's own layout order
    plan = plan_shards([(n, TORCH_TO_SAFETENSORS[tensors[n].dtype], tuple(tensors[n].shape))
                        for n in order], None)
    out = tmp_path / "out"
    with StreamingWriter(out, plan) as writer:
        for n in order:
            writer.write(n, tensors[n])
    assert (out / "model.safetensors").read_bytes() == ref.read_bytes()


@pytest.mark.parametrize("shard_bytes", [None, 1, 70_000, 200_000])
def test_out_of_order_writes_give_the_same_files(tmp_path, shard_bytes):
    tensors = _model(2)
    entries = _entries(tensors)
    in_order = tmp_path / "in_order"
    write_checkpoint(in_order, tensors.items(), shard_bytes)

    plan = plan_shards(entries, shard_bytes)
    out = tmp_path / "shuffled"
    perm = torch.randperm(len(entries), generator=torch.Generator().manual_seed(3)).tolist()
    with StreamingWriter(out, plan) as writer:
        for k in perm:
            name = entries[k][0]
            # tensors, non-contiguous tensors and raw buffers are all accepted
            t = tensors[name]
            if k % 3 == 0 and t.dim() == 2:
                t = t.t().contiguous().t()
            elif k % 3 == 1:
                writer.write(name, memoryview(_bytes(t)))
                continue
            writer.write(name, t)
    assert _final_files(out) == _final_files(in_order)
    for f in _final_files(out):
        assert (out / f).read_bytes() == (in_order / f).read_bytes()

    ckpt = open_checkpoint(out)
    assert set(ckpt.tensors) == set(tensors)
    assert [p.name for p in ckpt.weight_files] == [s.filename for s in plan.shards]
    # read order: file by file, by offset inside a file
    keys = [(ckpt.weight_files.index(i.file), i.data_start) for i in ckpt.tensors.values()]
    assert keys == sorted(keys)
    with TensorReader() as reader:
        for name, info in ckpt.tensors.items():
            assert _bytes(reader.read_tensor(info)) == _bytes(tensors[name])

    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["complete"] is True
    for entry in manifest["shards"]:
        data = (out / entry["file"]).read_bytes()
        assert entry["done"] and entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()


def test_manifest_tracks_completed_shards(tmp_path):
    tensors = {f"w{i}": torch.randn(25) for i in range(4)}
    plan = plan_shards(_entries(tensors), 200)  # two shards of two tensors
    writer = StreamingWriter(tmp_path, plan)
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert [s["done"] for s in manifest["shards"]] == [False, False]
    writer.write("w1", tensors["w1"])
    writer.write("w0", tensors["w0"])  # shard 1 complete (out of order: hashed by reading back)
    writer.write("w2", tensors["w2"])
    writer.wait()  # shard 1 is finished on a background thread
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    first = tmp_path / "model-00001-of-00002.safetensors"
    assert manifest["shards"][0]["done"] and not manifest["shards"][1]["done"]
    assert manifest["shards"][0]["sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
    assert _final_files(tmp_path) == ["model-00001-of-00002.safetensors"]
    assert (tmp_path / ".model-00002-of-00002.safetensors.partial").exists()
    assert writer.missing() == ["w3"]
    with pytest.raises(TensorWriteError, match="'w3'"):
        writer.finalize()
    writer.write("w3", tensors["w3"])
    files = writer.finalize()
    assert [f.name for f in files] == ["model-00001-of-00002.safetensors",
                                       "model-00002-of-00002.safetensors",
                                       "model.safetensors.index.json"]
    assert writer.finalize() == files
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [MANIFEST_NAME] + [f.name for f in files])


def test_finalize_records_side_files_and_the_index_before_the_index_is_written(tmp_path):
    tensors = {f"w{i}": torch.randn(25) for i in range(4)}
    writer = StreamingWriter(tmp_path, plan_shards(_entries(tensors), 200))
    for name, t in tensors.items():
        writer.write(name, t)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(OutputFileError, match="gone.json"):
        writer.finalize(["config.json", "gone.json"])
    assert not (tmp_path / "model.safetensors.index.json").exists()

    writer = StreamingWriter(tmp_path, plan_shards(_entries(tensors), 200))
    for name, t in tensors.items():
        writer.write(name, t)
    writer.finalize(["config.json", "config.json"])
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert manifest["side_files"] == [
        {"file": "config.json", "bytes": 23,
         "sha256": hashlib.sha256(b'{"model_type": "llama"}').hexdigest()}]
    index = (tmp_path / "model.safetensors.index.json").read_bytes()
    assert manifest["index_sha256"] == hashlib.sha256(index).hexdigest()


# ------------------------------------------------------------------------------------------------
# abort and errors
# ------------------------------------------------------------------------------------------------
def test_abort_leaves_no_final_named_files(tmp_path):
    tensors = {f"w{i}": torch.randn(25) for i in range(6)}
    (tmp_path / "keep.txt").write_text("not ours")
    writer = StreamingWriter(tmp_path, plan_shards(_entries(tensors), 200))
    for name in ["w0", "w1", "w2", "w5"]:  # shard 1 renamed into place, shards 2-3 partial
        writer.write(name, tensors[name])
    writer.wait()
    assert "model-00001-of-00003.safetensors" in _final_files(tmp_path)
    writer.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    writer.abort()
    with pytest.raises(TensorWriteError, match="aborted"):
        writer.write("w3", tensors["w3"])
    with pytest.raises(TensorWriteError, match="aborted"):
        writer.finalize()


def test_context_manager_aborts_on_exception(tmp_path):
    tensors = {"a": torch.randn(3), "b": torch.randn(4)}
    with pytest.raises(KeyError), StreamingWriter(tmp_path, plan_shards(_entries(tensors), None)) \
            as writer:
        writer.write("a", tensors["a"])
        raise KeyError("boom")
    assert list(tmp_path.iterdir()) == []
    # and on an incomplete plan at exit
    with pytest.raises(TensorWriteError, match="never written: 'b'"), \
            StreamingWriter(tmp_path, plan_shards(_entries(tensors), None)) as writer:
        writer.write("a", tensors["a"])
    assert list(tmp_path.iterdir()) == []


def test_wrong_tensors_are_named(tmp_path):
    plan = plan_shards([("w", "BF16", (3, 5)), ("b", "F32", (5,))], None)
    writer = StreamingWriter(tmp_path, plan)
    with pytest.raises(TensorWriteError, match="'w' was planned as BF16"):
        writer.write("w", torch.zeros(3, 5))
    with pytest.raises(TensorWriteError, match=r"'w' was planned with shape \[3, 5\]"):
        writer.write("w", torch.zeros(5, 3, dtype=torch.bfloat16))
    with pytest.raises(TensorWriteError, match="'b'.*needs 20 bytes, got 16"):
        writer.write("b", bytes(16))
    with pytest.raises(TensorWriteError, match="'x' is not in the output plan"):
        writer.write("x", torch.zeros(1))
    with pytest.raises(TensorWriteError, match="cannot write a int"):
        writer.write("b", 5)
    writer.write("b", torch.arange(5, dtype=torch.float32))
    with pytest.raises(TensorWriteError, match="'b' is written twice"):
        writer.write("b", torch.arange(5, dtype=torch.float32))
    writer.write("w", torch.ones(3, 5, dtype=torch.bfloat16))
    writer.finalize()
    with pytest.raises(TensorWriteError, match="finalized"):
        writer.write("w", torch.ones(3, 5, dtype=torch.bfloat16))
    loaded = safetensors.torch.load_file(tmp_path / "model.safetensors")
    assert torch.equal(loaded["b"], torch.arange(5, dtype=torch.float32))
    assert torch.equal(loaded["w"], torch.ones(3, 5, dtype=torch.bfloat16))


def test_not_enough_space_fails_up_front(tmp_path):
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    n = free // 4 + (1 << 30)  # more than free space, as one planned tensor (nothing written)
    plan = plan_shards([("huge", "F32", (n,))], None)
    with pytest.raises(OutputFileError, match="not enough free space") as err:
        StreamingWriter(tmp_path, plan)
    assert err.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


_FAILING_WRITE = textwrap.dedent("""
    import resource, signal, sys
    import torch
    from mergecore.io.writer import StreamingWriter, plan_shards
    from mergecore.io.errors import OutputFileError

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
    out = sys.argv[1]
    plan = plan_shards([("a", "F32", (100,)), ("b", "F32", (100,)), ("c", "F32", (50_000,))],
                       800)
    writer = StreamingWriter(out, plan, check_space=False)
    writer.write("a", torch.ones(100))
    writer.write("b", torch.ones(100))      # shard 1 complete: renamed into place
    writer.wait()
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    try:
        writer.write("c", torch.ones(50_000))   # 200 kB > the 100 kB file-size limit
    except OutputFileError as exc:
        print("ERRNO", exc.errno)
        print("MESSAGE", exc)
    else:
        print("NO ERROR")
""")


def test_injected_write_failure_names_the_file_and_cleans_up(tmp_path):
    """A real kernel write failure (RLIMIT_FSIZE -> EFBIG) in a child process."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _FAILING_WRITE, str(out)], check=False,
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"ERRNO {errno.EFBIG}" in proc.stdout, proc.stdout
    assert "model-00002-of-00002.safetensors" in proc.stdout
    assert "'c'" in proc.stdout
    assert list(out.iterdir()) == []  # the completed shard 1 and the partial 2 are gone


_FULL_DISK = textwrap.dedent("""
    import os, sys
    import torch
    from mergecore.io.writer import StreamingWriter, plan_shards
    from mergecore.io.errors import OutputFileError

    out = sys.argv[1]
    plan = plan_shards([("a", "F32", (25_000,)), ("b", "F32", (100_000,))], 200_000)
    try:
        StreamingWriter(out, plan)
    except OutputFileError as exc:
        print("UPFRONT", exc.errno)
    writer = StreamingWriter(out, plan, check_space=False)
    writer.write("a", torch.ones(25_000))   # shard 1 (100 kB) fits and is renamed into place
    writer.wait()
    print("AFTER_A", sorted(os.listdir(out)))
    try:
        writer.write("b", torch.ones(100_000))  # 400 kB into what is left of 256 kB
    except OutputFileError as exc:
        print("ERRNO", exc.errno)
        print("MESSAGE", exc)
    print("LEFT", sorted(os.listdir(out)))
""")


def test_disk_full_on_a_real_small_file_system(tmp_path):
    """ENOSPC from a 256 KiB tmpfs mounted in a private mount namespace (root only)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = tmp_path / "child.py"
    script.write_text(_FULL_DISK)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    shell = (f"mount -t tmpfs -o size=256k tmpfs '{mnt}' || exit 77; "
             f"exec '{sys.executable}' '{script}' '{mnt}/out'")
    try:
        proc = subprocess.run(["unshare", "-m", "sh", "-c", shell], check=False,
                              capture_output=True, text=True, env=env, timeout=120)
    except FileNotFoundError:
        pytest.skip("unshare is not installed")
    if proc.returncode == 77 or (proc.returncode != 0 and proc.stderr.startswith("unshare")):
        pytest.skip(f"cannot mount a private tmpfs here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert f"UPFRONT {errno.ENOSPC}" in lines
    assert "AFTER_A ['.mergecore-manifest.json', 'model-00001-of-00002.safetensors']" in lines
    assert f"ERRNO {errno.ENOSPC}" in lines
    message = next(x for x in lines if x.startswith("MESSAGE"))
    assert "model-00002-of-00002.safetensors" in message and "'b'" in message
    assert "LEFT []" in lines


def test_failure_while_finishing_a_shard_is_raised_and_cleans_up(tmp_path):
    """A real rename failure (a directory sits at the shard's final name)."""
    tensors = {f"w{i}": torch.randn(25) for i in range(4)}
    plan = plan_shards(_entries(tensors), 200)
    (tmp_path / "model-00001-of-00002.safetensors").mkdir()
    writer = StreamingWriter(tmp_path, plan)
    writer.write("w0", tensors["w0"])
    writer.write("w1", tensors["w1"])  # completes shard 1: its rename fails in the background
    with pytest.raises(OutputFileError, match="model-00001-of-00002.safetensors") as err:
        # the background failure surfaces at the next call: this write if it already happened,
        # else wait()
        writer.write("w2", tensors["w2"])
        writer.wait()
    assert err.value.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-00001-of-00002.safetensors"]
    assert (tmp_path / "model-00001-of-00002.safetensors").is_dir()  # not ours: left alone
    with pytest.raises(OutputFileError):
        writer.write("w3", tensors["w3"])


def test_concurrent_writers(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    tensors = _model(4)
    write_checkpoint(tmp_path / "ref", tensors.items(), 150_000)
    plan = plan_shards(_entries(tensors), 150_000)
    names = list(tensors)
    perm = torch.randperm(len(names), generator=torch.Generator().manual_seed(5)).tolist()
    with StreamingWriter(tmp_path / "out", plan) as writer, ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda k: writer.write(names[k], tensors[names[k]]), perm))
    for f in _final_files(tmp_path / "ref"):
        assert (tmp_path / "out" / f).read_bytes() == (tmp_path / "ref" / f).read_bytes()
