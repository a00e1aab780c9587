"""``mergecore merge CONFIG OUT_DIR``: config -> plan -> streaming pipeline -> finished output.

Order of work, so that nothing long starts before everything checkable has been checked:
1. parse the YAML and open every input's safetensors headers (no tensor data is read);
2. build and validate the plan, check the output directory and the free disk space
   (``mergecore.preflight``; every problem listed at once); with ``--resume``, verify the
   shards an interrupted run completed (``mergecore.resume``);
3. stream: read, merge, write shards under temporary names, rename each when complete;
4. write config.json, tokenizer files, the model card and the YAML; the index comes last.
An interruption (SIGINT, SIGTERM) or an OS error (disk full) keeps the completed shards and
the manifest for ``--resume`` and deletes the temporary files; any other error removes
everything the run wrote. An output never looks complete when it is not.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mergecore import faults, preflight
from mergecore.config.errors import ConfigError
from mergecore.config.layout import config_vocab_size
from mergecore.devices import check_device
from mergecore.dtypes import dtype_name
from mergecore.heap import release_freed_memory_promptly
from mergecore.interrupt import handle_termination, keeps_progress
from mergecore.io import (
    StreamingWriter,
    TensorReader,
    plan_shards,
    split_model_ref,
    tokenizer_files,
)
from mergecore.io.types import SAFETENSORS_DTYPES
from mergecore.out_lock import OutputLock, busy_message, empty_directory
from mergecore.pipeline import MergePipeline, PipelineOptions, PipelineStats, _item_bytes
from mergecore.resume import (
    FINGERPRINT_KEY,
    Fingerprint,
    ResumeError,
    ResumeState,
    check_resume,
    plan_fingerprint,
    prepare_resume_dir,
)
from mergecore.tokenizer import (
    resolve_chat_template,
    tokenizer_size_problems,
    write_chat_template,
)

if TYPE_CHECKING:
    from mergecore.io.writer import ShardPlan
    from mergecore.pipeline import WorkItem
    from mergecore.plan import MergePlan, PlannedTensor
    from mergecore.recipes.graph import RecipePlan


@dataclass
class MergeOptions:
    """What the command line (or a Python caller) can set for one merge."""

    device: str = "cpu"
    out_shard_size: int = 5_000_000_000
    copy_tokenizer: bool = True
    write_model_card: bool = True
    allow_crimes: bool = False
    num_threads: int | None = None
    random_seed: int | None = None
    max_memory: int | None = None  # None: mergecore.budget.auto_budget
    overwrite: bool = False
    resume: bool = False
    quiet: bool = False
    dry_run: bool = False
    verbose: int = 0
    keep_intermediates: str | None = None  # recipes: write each stage's model under this dir


@dataclass
class MergeResult:
    """What a merge produced."""

    out_dir: Path
    files: list[Path]
    stats: PipelineStats
    plan: MergePlan | RecipePlan


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"output path {str(out_dir)!r} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"output directory {str(out_dir)!r} is not empty; pass --overwrite to replace it"
            )
        empty_directory(out_dir)  # in place: a lock on the directory stays valid
    out_dir.mkdir(parents=True, exist_ok=True)


def check_output(out_dir: Path, options: MergeOptions, shards: ShardPlan,
                 fingerprint: str | Fingerprint, *,
                 input_dirs: set[Path], tokenizer_source: Path | None,
                 lock: OutputLock | None = None,
                 config_path: str | os.PathLike | None = None,
                 vocab_size: int | None = None,
                 write_tokenizer: bool | None = None) -> ResumeState:
    """Every output-side problem at once (``OutputCheckError``): the directory (not being
    written by another merge: ``lock`` is taken when it exists; empty unless
    --overwrite/--resume; writable; none of ``input_dirs``), what ``--resume`` keeps (verified
    against the manifest, whose fingerprint must be ``fingerprint``), the free space, and
    that the tokenizer to be copied (when ``write_tokenizer``; None: ``options.copy_tokenizer``)
    uses no token id past the output's ``vocab_size`` rows."""
    if lock is not None and lock.busy():
        raise preflight.OutputCheckError(out_dir, [busy_message(out_dir)])
    problems = preflight.directory_problems(out_dir, overwrite=options.overwrite,
                                            resume=options.resume)
    input_dirs = input_dirs | ({tokenizer_source} if tokenizer_source is not None else set())
    problems += preflight.input_overlap_problems(out_dir, input_dirs)
    problems += preflight.config_inside_output_problems(out_dir, config_path,
                                                        options.keep_intermediates)
    state = ResumeState()
    if options.resume and not problems:
        try:
            state = check_resume(out_dir, shards, fingerprint, quiet=options.quiet)
        except ResumeError as exc:
            problems.append(str(exc))
    extra = 0
    if write_tokenizer is None:
        write_tokenizer = options.copy_tokenizer
    if write_tokenizer and tokenizer_source is not None:
        extra = sum(f.stat().st_size for f in tokenizer_files(tokenizer_source) if f.is_file())
        problems += tokenizer_size_problems(tokenizer_source, vocab_size)
    problems += preflight.space_problems(out_dir, shards, overwrite=options.overwrite,
                                         kept=state.completed, extra_bytes=extra)
    if problems:
        raise preflight.OutputCheckError(out_dir, problems)
    return state


def writes_tokenizer(plan: MergePlan, options: MergeOptions) -> bool:
    """Whether the output of ``plan`` gets a tokenizer: with --copy-tokenizer (the default),
    or when its YAML names a ``tokenizer_source``, which asks for one whatever the flag says
    (as mergekit 0.1.5 does: it builds the tokenizer of a tokenizer_source and saves it)."""
    return options.copy_tokenizer or plan.tokenizer_source is not None


def tokenizer_warnings(plan: MergePlan, options: MergeOptions) -> list[str]:
    """What --no-copy-tokenizer does not do for ``plan``: skip a tokenizer its YAML asks for,
    or apply a chat template to a tokenizer that is not written."""
    if options.copy_tokenizer:
        return []
    if plan.tokenizer_source is not None:
        return [(f"--no-copy-tokenizer has no effect: the YAML's tokenizer_source "
                f"({plan.tokenizer_source}) asks for a tokenizer, which is written as mergekit "
                "does; leave tokenizer_source out to write none")]
    if plan.chat_template:
        return ["chat_template is ignored: with --no-copy-tokenizer no tokenizer is written"]
    return []


def with_output_problems(exc: ConfigError, out_dir: Path, options: MergeOptions
                         ) -> ConfigError:
    """``exc`` with the output directory's problems added, so one error lists them all."""
    extra = preflight.directory_problems(out_dir, overwrite=options.overwrite,
                                         resume=options.resume)
    return ConfigError(exc.problems + extra, source=exc.source)


def prepare_output(out_dir: Path, options: MergeOptions, shards: ShardPlan, state: ResumeState,
                   lock: OutputLock | None = None) -> None:
    """Make ``out_dir`` ready for the writer: with --resume keep the verified shards (and say
    so), else an empty directory (--overwrite empties an existing one). ``lock`` is taken on a
    directory created here (a merge that created it at the same moment wins, the other stops)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if lock is not None and not lock.acquire():
        raise FileExistsError(busy_message(out_dir))
    if not options.resume:
        _prepare_out_dir(out_dir, options.overwrite)
        return
    prepare_resume_dir(out_dir, shards, state)
    if not options.quiet:
        print(state.summary(len(shards.shards)), file=sys.stderr)


def input_directories(tensors: Iterable[WorkItem]) -> set[Path]:
    """The directories of every input file of the planned ``tensors`` (the output directory
    may not be one of them)."""
    return {Path(i.info.file).parent for t in tensors for i in t.inputs}


def remaining_tensors(tensors: Sequence[WorkItem], shards: ShardPlan,
                      completed: dict[str, str | None]) -> list[WorkItem]:
    """The work items whose output tensor is not in one of the ``completed`` shards."""
    if not completed:
        return list(tensors)
    done = {name for spec in shards.shards if spec.filename in completed
            for name, _, _ in spec.entries}
    return [t for t in tensors if t.name not in done]


class _Progress:
    """A tqdm bar over input bytes with GB/s and ETA (only on a terminal, not with --quiet)."""

    def __init__(self, total: int, quiet: bool):
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000,
                            desc="merging", dynamic_ncols=True, smoothing=0.1)

    def __call__(self, nbytes: int) -> None:
        if self.bar is not None:
            self.bar.update(nbytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def report_warnings(warnings: list[str]) -> None:
    """Print the config's and the plan's warnings to stderr, each once (also with --quiet:
    they say that something in the config is ignored or changed)."""
    for line in dict.fromkeys(warnings):
        print(f"mergecore: warning: {line}", file=sys.stderr)


def budget_warnings(tensors: Sequence[WorkItem], options: MergeOptions) -> list[str]:
    """A warning when ``--max-memory`` is below what one tensor needs: the pipeline then lets
    that tensor through alone, so the budget is exceeded (better said up front)."""
    if options.max_memory is None:
        return []
    from mergecore.lora.inputs import PlanAdapters
    from mergecore.pipeline import largest_held
    from mergecore.units import human_bytes

    adapters = PlanAdapters.for_plan(tensors)
    try:
        largest = largest_held(tensors, adapters)
    finally:
        if adapters is not None:
            adapters.close()
    if largest <= options.max_memory:
        return []
    need = human_bytes(largest)
    return [(f"--max-memory {human_bytes(options.max_memory)} is below the {need} the largest "
             "tensor holds in flight (its inputs and output): such a tensor is merged alone "
             "and takes what it needs, beyond the budget")]


def describe_plan(plan: MergePlan, options: MergeOptions, *, verbose: int = 0) -> str:
    """The plan as text: tensors, their inputs, shards, bytes to read and write."""
    from mergecore.units import human_bytes

    entries = [(t.name, t.out_dtype, tuple(t.shape)) for t in plan.tensors]
    shards = plan_shards(entries, options.out_shard_size)
    methods: dict[str, int] = {}
    for t in plan.tensors:
        methods[t.method] = methods.get(t.method, 0) + 1
    lines = [
        f"merge method: {plan.method}" + (f" (base {plan.base_model})" if plan.base_model else ""),
        "models: " + ", ".join(plan.models),
        f"output tensors: {len(plan.tensors)} ("
        + ", ".join(f"{n} {m}" for m, n in sorted(methods.items())) + ")",
        f"layers in the output: {plan.num_layers}",
        f"read: {human_bytes(plan.total_input_bytes)}, write: {human_bytes(plan.total_output_bytes)}",
        f"shards: {len(shards.shards)}",
    ]
    lines += [f"  {spec.filename}: {len(spec.entries)} tensors, {human_bytes(spec.data_bytes)}"
              for spec in shards.shards]
    if verbose:
        lines += [f"  {t.name} {list(t.shape)} {t.out_dtype} <- {_describe_call(t)}"
                  for t in plan.tensors]
    return "\n".join(lines)


def _param_text(params: dict) -> str:
    """``{"t": 0.35, "normalize": True}`` -> ``"t=0.35, normalize=True"``."""
    return ", ".join(f"{k}={format(v, 'g') if isinstance(v, float) else v}"
                     for k, v in params.items() if v is not None)


def _describe_call(t: PlannedTensor) -> str:
    """One planned tensor as a call with its resolved parameters (after gradients, filters
    and precedence): ``ties[normalize=True](base:NAME, ft1:NAME{weight=1, density=0.5})``."""
    per_input = t.input_params or {}
    parts = []
    for k, i in enumerate(t.inputs):
        mine = _param_text({key: values[k] for key, values in per_input.items()
                             if values is not None and k < len(values)})
        parts.append(f"{Path(i.info.file).parent.name}"
                     f"{'+' + Path(i.adapter).name if i.adapter else ''}:{i.info.name}"
                     + (f"{{{mine}}}" if mine else ""))
    params = _param_text(t.global_params or {})
    return f"{t.method}{f'[{params}]' if params else ''}({', '.join(parts)})"


def describe_budget(plan: MergePlan | RecipePlan, options: MergeOptions) -> str:
    """The memory budget the merge of ``plan`` would run with, and where it comes from."""
    from mergecore.lora.inputs import PlanAdapters
    from mergecore.pipeline import largest_held, run_budget
    from mergecore.units import human_bytes

    adapters = PlanAdapters.for_plan(plan.tensors)
    try:
        budget = run_budget(plan.tensors, adapters, options.max_memory)
        largest = largest_held(plan.tensors, adapters)
    finally:
        if adapters is not None:
            adapters.close()
    how = ("--max-memory" if options.max_memory is not None else
           "automatic: three of the largest tensor's inputs and output, at least 2 GiB, at most "
           "half the available memory")
    return (f"memory budget: {human_bytes(budget)} ({how}); the largest tensor holds "
            f"{human_bytes(largest)} in flight")


def run_plan(plan: MergePlan, out_dir: Path, options: MergeOptions, *, yaml_text: str = "",
             tokenizer_source: Path | None = None,
             fingerprint: str | Fingerprint | None = None,
             resume: ResumeState | None = None) -> MergeResult:
    """Execute an already validated plan into ``out_dir`` (which must be prepared).

    ``fingerprint`` is recorded in the manifest; ``resume`` names the verified shards of an
    interrupted run that are kept (their tensors are not merged again)."""
    release_freed_memory_promptly()  # keeps the resident size near the --max-memory budget
    if options.num_threads:
        os.environ["MERGECORE_NUM_THREADS"] = str(options.num_threads)
        cpu_backend = sys.modules.get("mergecore.backends.cpu")
        if cpu_backend is not None:  # already imported: it read the variable then
            cpu_backend.set_num_threads(options.num_threads)
    entries = [(t.name, t.out_dtype, tuple(t.shape)) for t in plan.tensors]
    shards = plan_shards(entries, options.out_shard_size)
    completed = dict(resume.completed) if resume is not None else {}
    work = plan
    if completed:
        todo = remaining_tensors(plan.tensors, shards, completed)
        work = dataclasses.replace(plan, tensors=todo, total_input_bytes=sum(
            _item_bytes(t)[0] for t in todo))
    progress = _Progress(work.total_input_bytes, options.quiet)
    pipe_options = PipelineOptions(device=options.device, max_memory=options.max_memory,
                                   random_seed=options.random_seed, progress=progress)
    extra = None
    if fingerprint:
        extra = (fingerprint.manifest_entries() if isinstance(fingerprint, Fingerprint)
                 else {FINGERPRINT_KEY: fingerprint})
    writer = None
    try:
        with TensorReader(nthreads=2, drop_cache=True) as reader, handle_termination():
            writer = StreamingWriter(out_dir, shards, manifest_extra=extra, completed=completed,
                                     keep_complete_on_os_error=True)
            stats = MergePipeline(work, reader, faults.wrap_writer(writer), pipe_options).run()
            finish_start = time.perf_counter()
            side_files = write_side_files(out_dir, plan, options, yaml_text=yaml_text,
                                          tokenizer_source=tokenizer_source)
            files = writer.finalize(side_files)
            stats.add_finish(time.perf_counter() - finish_start)
    except BaseException as exc:
        if writer is not None:  # no-op once finalized
            if keeps_progress(exc):
                writer.suspend()  # keep complete shards and the manifest for --resume
            else:
                writer.abort()
            remove_unfinished_side_files(out_dir, writer, tokenizer_source)
        raise
    finally:
        progress.close()
    return MergeResult(out_dir, files, stats, plan)


def side_file_names(tokenizer_source: Path | None) -> list[str]:
    """The names of every file ``write_side_files`` may write into an output directory."""
    names = ["config.json", "README.md", "mergekit_config.yml", "chat_template.jinja"]
    if tokenizer_source is not None:
        names += [f.name for f in tokenizer_files(tokenizer_source)]
    return list(dict.fromkeys(names))


def remove_unfinished_side_files(out_dir: Path, writer: StreamingWriter,
                                 tokenizer_source: Path | None) -> None:
    """After a run stopped or failed: unless ``writer`` finalized the output, delete the side
    files, so that what is left (the completed shards and the manifest) never looks like a
    finished model; ``--resume`` writes them again."""
    if not writer.finalized:
        from mergecore import output_files

        output_files.remove_side_files(out_dir, side_file_names(tokenizer_source))


def write_side_files(out_dir: Path, plan: MergePlan, options: MergeOptions, *, yaml_text: str,
                     tokenizer_source: Path | None,
                     template_dirs: list[Path] | None = None) -> list[str]:
    """Everything of an output but the weights: config.json, the tokenizer (with the config's
    chat template; ``auto`` picks among ``template_dirs``, by default the plan's models), the
    YAML and the model card (written before the writer is finalized, so the index still
    comes last). Returns the names of the files written, for the manifest."""
    from mergecore import output_files

    written: list[str] = []
    if plan.output_config is not None:
        output_files.write_config_json(out_dir, plan.output_config)
        written.append("config.json")
    if writes_tokenizer(plan, options) and tokenizer_source is not None:
        written += output_files.copy_tokenizer(out_dir, tokenizer_files(tokenizer_source))
        if plan.chat_template:
            dirs = template_dirs if template_dirs is not None else [
                Path(split_model_ref(m)[0]) for m in plan.models]
            template = resolve_chat_template(plan.chat_template, dirs)
            if template:
                write_chat_template(out_dir, template)  # replaces any chat_template.json
                written = [n for n in written if n != "chat_template.json"]
                written += ["chat_template.jinja", "tokenizer_config.json"]
    if yaml_text:
        output_files.write_config_yaml(out_dir, yaml_text)
        written.append("mergekit_config.yml")
        if options.write_model_card:
            out_dtypes = sorted({t.out_dtype for t in plan.tensors})
            output_files.write_model_card(
                out_dir, method=plan.method, base_model=plan.base_model,
                models=plan.models, yaml_text=yaml_text,
                dtype=", ".join(dtype_name(SAFETENSORS_DTYPES[d][0]) for d in out_dtypes),
            )
            written.append("README.md")
    return list(dict.fromkeys(written))


def run_merge(config_path: str | os.PathLike, out_dir: str | os.PathLike,
              options: MergeOptions | None = None) -> MergeResult:
    """Merge as ``config_path`` says into ``out_dir`` (the whole command)."""
    from mergecore.config import load_merge
    from mergecore.recipes import is_recipe, run_recipe

    options = options or MergeOptions()
    if options.overwrite and options.resume:
        raise ValueError("--overwrite and --resume exclude each other")
    config_file = Path(config_path)
    if not config_file.is_file():
        what = "is a directory" if config_file.is_dir() else "does not exist"
        raise ValueError(f"config file {os.fspath(config_path)!r} {what} (expected a mergekit "
                         "YAML file)")
    options.device = check_device(options.device)  # before the output directory is touched
    out_dir = Path(out_dir)
    if is_recipe(config_path):
        return run_recipe(config_path, out_dir, options)
    yaml_text = Path(config_path).read_text(encoding="utf-8")
    try:
        plan = load_merge(config_path, random_seed=options.random_seed,
                          allow_crimes=options.allow_crimes)
    except ConfigError as exc:
        raise with_output_problems(exc, out_dir, options) from None
    report_warnings(plan.warnings + budget_warnings(plan.tensors, options)
                    + tokenizer_warnings(plan, options))
    if options.random_seed is None and plan.random_seed is not None:
        options.random_seed = plan.random_seed
    source = Path(plan.tokenizer_path) if plan.tokenizer_path else None
    entries = [(t.name, t.out_dtype, tuple(t.shape)) for t in plan.tensors]
    shards = plan_shards(entries, options.out_shard_size)
    fingerprint = plan_fingerprint(plan, out_shard_size=options.out_shard_size,
                                   random_seed=options.random_seed, device=options.device)
    if options.dry_run:
        print(describe_plan(plan, options, verbose=options.verbose))
        print(describe_budget(plan, options))
    with OutputLock(out_dir) as lock:  # held until the output is finalized or abandoned
        state = check_output(out_dir, options, shards, fingerprint,
                             input_dirs=input_directories(plan.tensors),
                             tokenizer_source=source, lock=lock, config_path=config_path,
                             vocab_size=config_vocab_size(plan.output_config),
                             write_tokenizer=writes_tokenizer(plan, options))
        if options.dry_run:
            return MergeResult(out_dir, [], PipelineStats(), plan)
        prepare_output(out_dir, options, shards, state, lock)
        return run_plan(plan, out_dir, options, yaml_text=yaml_text, tokenizer_source=source,
                        fingerprint=fingerprint, resume=state)
