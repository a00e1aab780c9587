"""mergekit 0.1.5 as a test oracle: run its CLI offline, load outputs, compare them in ulps.

* :func:`run_mergekit_yaml` runs ``python -m mergekit.scripts.run_yaml CONFIG OUT`` (the
  ``mergekit-yaml`` console script) in a subprocess on the CPU, offline; :func:`run_mergekit_batch`
  runs several configs in one subprocess (mergekit's import costs tens of seconds on small
  machines).
* :func:`run_mergekit_multi` runs ``mergekit-multi`` (multi-stage recipes) the same way.
* :func:`load_state` reads every tensor of an output directory (sharded or not).
* :func:`ulp_diff` is the elementwise distance in units in the last place of the dtype.
* :func:`compare_outputs` checks two outputs against each other by the rules of
  ``docs/semantics.md`` ("Tolerances used by the tests"): same names, shapes and dtypes, non-float tensors
  identical, and per float tensor a minimum share of elements within 1 ulp.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ComparisonReport",
    "MergekitError",
    "TensorComparison",
    "compare_outputs",
    "load_state",
    "mergekit_env",
    "run_mergekit_batch",
    "run_mergekit_multi",
    "run_mergekit_multi_batch",
    "run_mergekit_yaml",
    "ulp_diff",
]

_RUNNER = Path(__file__).with_name("_mergekit_runner.py")
_STDERR_TAIL = 6000
#: The ulp distance reported where exactly one of the two values is NaN.
NAN_MISMATCH = torch.iinfo(torch.int64).max


class MergekitError(RuntimeError):
    """mergekit failed; the message holds the command, the exit status and its stderr."""


# --------------------------------------------------------------------------------------------
# running mergekit


def mergekit_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment mergekit runs in: offline (no hub access), CPU only, quiet tokenizers."""
    env = dict(os.environ if base is None else base)
    env.update({
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def _write_config(config: str | os.PathLike | Mapping[str, Any], tmp: Path, i: int) -> Path:
    """A path to the YAML config: the given file, or ``config`` written as YAML into ``tmp``."""
    if isinstance(config, Mapping):
        import yaml

        path = tmp / f"config{i}.yml"
        path.write_text(yaml.safe_dump(_plain(config), sort_keys=False), encoding="utf-8")
        return path
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"mergekit config {str(path)!r} does not exist")
    return path.resolve()


def _plain(value: Any) -> Any:
    """Paths to strings, tuples to lists, recursively (so yaml.safe_dump accepts the dict)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _tail(text: str) -> str:
    return text if len(text) <= _STDERR_TAIL else "...\n" + text[-_STDERR_TAIL:]


def run_mergekit_yaml(
    config_path_or_dict: str | os.PathLike | Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    extra_args: Sequence[str] = (),
    timeout: float | None = 1800,
) -> Path:
    """Run ``mergekit-yaml CONFIG OUT_DIR *extra_args`` (mergekit's CLI) in a subprocess.

    ``config_path_or_dict`` is a YAML file or a dict (written to a temporary YAML file; paths
    may be ``Path`` objects). The child runs with :func:`mergekit_env` (offline, no GPU).
    Returns ``out_dir`` as a ``Path``; raises :class:`MergekitError` with mergekit's stderr when
    it exits non-zero, and ``subprocess.TimeoutExpired`` after ``timeout`` seconds.
    """
    out = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="mergekit-cfg-") as tmp:
        cfg = _write_config(config_path_or_dict, Path(tmp), 0)
        cmd = [sys.executable, "-m", "mergekit.scripts.run_yaml", str(cfg), str(out),
               *map(str, extra_args)]
        proc = subprocess.run(cmd, env=mergekit_env(), capture_output=True, text=True,
                              timeout=timeout, check=False)
        if proc.returncode != 0:
            config_text = cfg.read_text(encoding="utf-8")
            raise MergekitError(
                f"mergekit-yaml failed (exit status {proc.returncode})\n"
                f"command: {' '.join(cmd)}\nconfig:\n{config_text}\n"
                f"stderr:\n{_tail(proc.stderr)}")
    return out


def run_mergekit_batch(
    jobs: Iterable[tuple[str | os.PathLike | Mapping[str, Any], str | os.PathLike]],
    *,
    extra_args: Sequence[str] = (),
    timeout: float | None = 3600,
) -> list[Path]:
    """Run several ``(config, out_dir)`` merges with mergekit's CLI in ONE subprocess.

    Each job goes through mergekit's ``mergekit-yaml`` click command with the same arguments
    as :func:`run_mergekit_yaml` (see ``_mergekit_runner.py``); only the interpreter start-up
    and imports are shared. All jobs are attempted; if any fails, :class:`MergekitError` names
    every failed job with its config and traceback. Returns the output directories.
    """
    jobs = list(jobs)
    with tempfile.TemporaryDirectory(prefix="mergekit-batch-") as tmp:
        tmp_path = Path(tmp)
        entries = []
        for i, (config, out_dir) in enumerate(jobs):
            cfg = _write_config(config, tmp_path, i)
            entries.append(([str(cfg), str(out_dir), *map(str, extra_args)], cfg))
        _run_runner(entries, tmp_path, timeout)
    return [Path(out) for _, out in jobs]


def run_mergekit_multi(
    recipe: str | os.PathLike | Sequence[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    intermediate_dir: str | os.PathLike,
    *,
    extra_args: Sequence[str] = (),
    timeout: float | None = 3600,
) -> Path:
    """Run ``mergekit-multi RECIPE --out-path OUT_DIR -I INTERMEDIATE_DIR`` (mergekit's
    multi-stage command) in a subprocess, offline on the CPU. ``recipe`` is a YAML file or a
    list of documents (dicts, written with ``---`` between them). Returns ``out_dir``."""
    return run_mergekit_multi_batch([(recipe, out_dir, intermediate_dir)],
                                    extra_args=extra_args, timeout=timeout)[0]


def run_mergekit_multi_batch(
    jobs: Iterable[tuple[str | os.PathLike | Sequence[Mapping[str, Any]], str | os.PathLike,
                         str | os.PathLike]],
    *,
    extra_args: Sequence[str] = (),
    timeout: float | None = 3600,
) -> list[Path]:
    """Several ``(recipe, out_dir, intermediate_dir)`` runs of :func:`run_mergekit_multi` in
    ONE subprocess (mergekit's import is shared). Returns the output directories."""
    import yaml

    jobs = list(jobs)
    with tempfile.TemporaryDirectory(prefix="mergekit-multi-") as tmp:
        tmp_path = Path(tmp)
        entries = []
        for i, (recipe, out_dir, intermediate_dir) in enumerate(jobs):
            if isinstance(recipe, (str, os.PathLike)):
                cfg = Path(recipe).resolve()
            else:
                cfg = tmp_path / f"recipe{i}.yml"
                cfg.write_text(yaml.safe_dump_all([_plain(d) for d in recipe], sort_keys=False),
                               encoding="utf-8")
            args = [str(cfg), "--out-path", str(out_dir), "-I", str(intermediate_dir),
                    *map(str, extra_args)]
            entries.append(({"command": "mergekit-multi", "args": args}, cfg))
        _run_runner(entries, tmp_path, timeout)
    return [Path(out) for _, out, _ in jobs]


def _run_runner(entries: list[tuple[Any, Path]], tmp_path: Path, timeout: float | None) -> None:
    """Run ``_mergekit_runner.py`` on ``(job, config file)`` entries; raise on any failure."""
    if not entries:
        return
    jobs_file, results_file = tmp_path / "jobs.json", tmp_path / "results.json"
    jobs_file.write_text(json.dumps([job for job, _ in entries]), encoding="utf-8")
    cmd = [sys.executable, str(_RUNNER), str(jobs_file), str(results_file)]
    proc = subprocess.run(cmd, env=mergekit_env(), capture_output=True, text=True,
                          timeout=timeout, check=False)
    results = (json.loads(results_file.read_text(encoding="utf-8"))
               if results_file.exists() else [])
    failures = []
    for i, (job, cfg) in enumerate(entries):
        if i < len(results) and results[i]["ok"]:
            continue
        error = results[i]["error"] if i < len(results) else "(not run: the runner died)"
        name, args = ((job["command"], job["args"]) if isinstance(job, dict)
                      else ("mergekit-yaml", job))
        failures.append(f"job {i + 1}: {name} {' '.join(args)}\nconfig:\n"
                        f"{cfg.read_text(encoding='utf-8')}\n{_tail(error)}")
    if failures or proc.returncode != 0:
        raise MergekitError(
            f"mergekit batch failed (exit status {proc.returncode}); "
            f"{len(failures)} of {len(entries)} jobs failed\n" + "\n\n".join(failures)
            + f"\nstderr:\n{_tail(proc.stderr)}")


# --------------------------------------------------------------------------------------------
# loading outputs


def load_state(out_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint: a directory (``model.safetensors.index.json``
    and its shards, else all ``*.safetensors`` files) or one ``.safetensors`` file. Raises
    ``FileNotFoundError`` when there are none and ``ValueError`` when a name occurs twice."""
    from safetensors.torch import load_file

    path = Path(out_dir)
    if path.is_file():
        files = [path]
    else:
        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = [path / f for f in sorted(set(weight_map.values()))]
        else:
            files = sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("."))
        if not files:
            raise FileNotFoundError(f"no safetensors files in {str(path)!r}")
    state: dict[str, torch.Tensor] = {}
    where: dict[str, Path] = {}
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"{str(f)!r} (named by the index of {str(path)!r}) is missing")
        for name, tensor in load_file(str(f)).items():
            if name in state:
                raise ValueError(f"tensor {name!r} is in both {where[name].name} and {f.name}")
            state[name] = tensor
            where[name] = f
    return dict(sorted(state.items()))


# --------------------------------------------------------------------------------------------
# ulps

_INT_VIEW = {
    torch.bfloat16: (torch.int16, 0x7FFF),
    torch.float16: (torch.int16, 0x7FFF),
    torch.float32: (torch.int32, 0x7FFFFFFF),
}


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """The bit pattern of ``t`` as an int64 whose order is the order of the float values
    (``-0.0`` and ``+0.0`` both map to 0; adjacent floats differ by 1)."""
    int_dtype, mag_mask = _INT_VIEW[t.dtype]
    bits = t.contiguous().view(int_dtype).to(torch.int64)
    mag = bits & mag_mask
    return torch.where(bits < 0, -mag, mag)


def ulp_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise ``|ord(a) - ord(b)|`` (int64): how many representable values of the dtype
    lie between ``a`` and ``b`` (0 = identical, 1 = neighbours; ``+0`` and ``-0`` are equal).

    ``a`` and ``b`` must have the same shape and the same dtype, one of bf16, fp16, fp32. Both
    NaN counts as 0, exactly one NaN as :data:`NAN_MISMATCH`; infinities are the values after
    the largest finite ones.
    """
    if a.dtype != b.dtype:
        raise TypeError(f"ulp_diff: dtypes differ ({a.dtype} vs {b.dtype})")
    if a.shape != b.shape:
        raise ValueError(f"ulp_diff: shapes differ ({tuple(a.shape)} vs {tuple(b.shape)})")
    if a.dtype not in _INT_VIEW:
        raise TypeError(f"ulp_diff supports bfloat16, float16 and float32, not {a.dtype}")
    a, b = a.detach().cpu(), b.detach().cpu()
    diff = (_ordered(a) - _ordered(b)).abs()
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    diff = torch.where(nan_a & nan_b, torch.zeros_like(diff), diff)
    return torch.where(nan_a ^ nan_b, torch.full_like(diff, NAN_MISMATCH), diff)


# --------------------------------------------------------------------------------------------
# comparing outputs


@dataclass(frozen=True)
class TensorComparison:
    """How one float tensor of two outputs compares."""

    name: str
    numel: int
    identical: float  # share of elements with 0 ulp distance
    within_1ulp: float  # share with at most 1 ulp
    max_ulp: int

    def __str__(self) -> str:
        return (f"{self.name}: {self.within_1ulp:.4%} within 1 ulp, "
                f"{self.identical:.4%} identical, max {self.max_ulp} ulp, {self.numel} elements")


@dataclass
class ComparisonReport:
    """The result of :func:`compare_outputs`: per-tensor stats and every problem found."""

    tensors: list[TensorComparison] = field(default_factory=list)
    non_float: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    min_within_1ulp: float = 1.0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def worst(self) -> list[TensorComparison]:
        """Float tensors, worst first (lowest share within 1 ulp, then largest max ulp)."""
        return sorted(self.tensors, key=lambda t: (t.within_1ulp, -t.max_ulp, t.name))

    @property
    def overall_within_1ulp(self) -> float:
        total = sum(t.numel for t in self.tensors)
        return sum(t.within_1ulp * t.numel for t in self.tensors) / total if total else 1.0

    def format(self, n_worst: int = 10, max_problems: int = 40) -> str:
        """A readable summary: totals, the problems (at most ``max_problems``), the worst
        ``n_worst`` float tensors."""
        lines = [(f"{len(self.tensors)} float tensors, {len(self.non_float)} non-float; "
                  f"{self.overall_within_1ulp:.4%} of float elements within 1 ulp "
                  f"(required per tensor: {self.min_within_1ulp:.4%})")]
        lines += [f"PROBLEM: {p}" for p in self.problems[:max_problems]]
        if len(self.problems) > max_problems:
            lines.append(f"... and {len(self.problems) - max_problems} more problems")
        if self.tensors:
            lines.append(f"worst {min(n_worst, len(self.tensors))} tensors:")
            lines += [f"  {t}" for t in self.worst[:n_worst]]
        return "\n".join(lines)


def _state(x: str | os.PathLike | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    return x if isinstance(x, Mapping) else load_state(x)


def compare_outputs(
    ours: str | os.PathLike | Mapping[str, torch.Tensor],
    theirs: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    min_within_1ulp: float,
    check: bool = True,
    n_worst: int = 10,
) -> ComparisonReport:
    """Compare two merge outputs (directories, single files, or name -> tensor dicts).

    Checks, in order: the same tensor names; per tensor the same shape and dtype; non-float
    tensors identical; and, per float tensor, the share of elements within 1 ulp
    (:func:`ulp_diff`) at least ``min_within_1ulp`` (a fraction, e.g. ``0.999``). With
    ``check`` (default) an ``AssertionError`` lists every problem and the ``n_worst`` worst
    tensors; otherwise the report is returned for inspection (``report.ok``).
    """
    if not 0.0 <= min_within_1ulp <= 1.0:
        raise ValueError(f"min_within_1ulp is a fraction in [0, 1], got {min_within_1ulp}")
    a, b = _state(ours), _state(theirs)
    report = ComparisonReport(min_within_1ulp=min_within_1ulp)
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a:
        report.problems.append(f"{len(only_a)} tensors only in ours: {_names(only_a)}")
    if only_b:
        report.problems.append(f"{len(only_b)} tensors only in theirs: {_names(only_b)}")
    for name in sorted(set(a) & set(b)):
        x, y = a[name], b[name]
        if x.shape != y.shape or x.dtype != y.dtype:
            report.problems.append(f"{name}: ours {tuple(x.shape)} {x.dtype}, "
                                   f"theirs {tuple(y.shape)} {y.dtype}")
            continue
        if not x.is_floating_point():
            report.non_float.append(name)
            if not torch.equal(x, y):
                n = int((x != y).sum())
                report.problems.append(f"{name}: non-float tensors differ in {n} of "
                                       f"{x.numel()} elements")
            continue
        d = ulp_diff(x, y)
        numel = d.numel()
        stats = TensorComparison(
            name=name, numel=numel,
            identical=float((d == 0).sum()) / numel if numel else 1.0,
            within_1ulp=float((d <= 1).sum()) / numel if numel else 1.0,
            max_ulp=int(d.max()) if numel else 0)
        report.tensors.append(stats)
        if stats.within_1ulp < min_within_1ulp:
            report.problems.append(f"{name}: {stats.within_1ulp:.4%} within 1 ulp "
                                   f"< {min_within_1ulp:.4%}")
    if check and report.problems:
        raise AssertionError("outputs differ:\n" + report.format(n_worst))
    return report


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
