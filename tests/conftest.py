"""Shared test setup: Triton kernels run in the interpreter when there is no GPU; in CI
every declared test dependency must import (a broken install fails instead of skipping)."""

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pyproject's `test` extra: tests importorskip these so that a partial local setup still runs
# what it can, but CI installs them all, so a missing or broken one is an error there.
DECLARED_TEST_DEPENDENCIES = ("mergekit", "transformers", "peft", "hypothesis", "triton",
                              "pytest_benchmark", "matplotlib")
if os.environ.get("CI"):
    for _module in DECLARED_TEST_DEPENDENCIES:
        importlib.import_module(_module)

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seeded():
    """Every test draws fresh, but reproducible, random inputs."""
    torch.manual_seed(int.from_bytes(os.urandom(2), "little") if os.environ.get("MERGECORE_TEST_RANDOM") else 1234)
    yield


@pytest.fixture(scope="session")
def small_family(tmp_path_factory):
    """A base and two fine-tunes (llama, hidden 64, 4 layers, bf16), generated once per session
    (reliability tests share it: generating takes seconds)."""
    from mergecore.synthetic import make_family

    root = tmp_path_factory.mktemp("small_family")
    return [str(p) for p in make_family(root, n_models=3, hidden=64, layers=4)]


@pytest.fixture(scope="module")
def keep_thread_settings():
    """Restore MERGECORE_NUM_THREADS and the CPU kernels' thread count after the module
    (``mergecore merge -j N`` run in-process changes both)."""
    from mergecore.backends import cpu

    env, threads = os.environ.get("MERGECORE_NUM_THREADS"), cpu.get_num_threads()
    yield
    if env is None:
        os.environ.pop("MERGECORE_NUM_THREADS", None)
    else:
        os.environ["MERGECORE_NUM_THREADS"] = env
    cpu.set_num_threads(threads)


@pytest.fixture
def select_tuning():
    """Run the C++ select_top with other small-job limits / chunk sizes (exercises every
    path); the defaults come back afterwards."""
    cpu = pytest.importorskip("mergecore.backends.cpu", reason="mergecore._C is not built")
    before = cpu._C._select_tuning(1 << 16, 0)
    cpu._C._select_tuning(*before)

    def setter(small_n: int, grain: int) -> None:
        cpu._C._select_tuning(small_n, grain)

    yield setter
    cpu._C._select_tuning(*before)


def _run_in_terminal(args: list[str], *, columns: int = 100, timeout: float = 120) -> str:
    """Run ``python -m mergecore *args`` with a pseudo-terminal ``columns`` wide as its
    stdin, stdout and stderr; returns everything it printed (escape codes included)."""
    import struct
    import subprocess
    import sys

    pty = pytest.importorskip("pty")
    fcntl = pytest.importorskip("fcntl")
    termios = pytest.importorskip("termios")

    master, slave = pty.openpty()
    # a fresh pty is 0 columns wide, where tqdm draws an empty bar
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "mergecore", *args], stdin=slave,
                            stdout=slave, stderr=slave, env={**os.environ, "TERM": "xterm"},
                            close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child has closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=timeout) in (0, 1)
    return b"".join(chunks).decode(errors="replace")


@pytest.fixture(scope="session")
def run_in_terminal():
    """``_run_in_terminal``: a mergecore command as it looks on a user's terminal."""
    return _run_in_terminal
