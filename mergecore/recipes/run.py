"""``mergecore merge RECIPE OUT_DIR`` for a multi-stage recipe: one fused streaming pass.

Order of work, as for a single merge: parse every document, open every input's headers,
plan every stage and fuse the graphs (all problems listed at once); prepare the output
directories; stream every fused tensor through the pipeline (each input tensor read once,
intermediate tensors only in memory); write the side files and finalize. With
``--keep-intermediates DIR`` each stage's model is also written to ``DIR/<name>`` in the
normal output layout, from the same pass.

Faults as for a single merge: the final output carries a manifest with the recipe's
fingerprint (``mergecore.resume.recipe_fingerprint``), an interruption or OS error keeps its
completed shards, and ``--resume`` verifies them and merges only the tensors of the other
shards (each of them again through the whole fused graph). Any other error removes
everything; kept intermediates are always removed on an error (``--resume`` and
``--keep-intermediates`` exclude each other).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import yaml

from mergecore import faults
from mergecore.config.errors import ConfigError
from mergecore.config.layout import config_vocab_size
from mergecore.heap import release_freed_memory_promptly
from mergecore.interrupt import handle_termination, keeps_progress
from mergecore.io import StreamingWriter, TensorReader, plan_shards
from mergecore.merge import (
    MergeOptions,
    MergeResult,
    _prepare_out_dir,
    _Progress,
    budget_warnings,
    check_output,
    describe_budget,
    describe_plan,
    input_directories,
    prepare_output,
    remaining_tensors,
    remove_unfinished_side_files,
    report_warnings,
    tokenizer_warnings,
    with_output_problems,
    write_side_files,
    writes_tokenizer,
)
from mergecore.out_lock import OutputLock
from mergecore.pipeline import MergePipeline, PipelineOptions, PipelineStats
from mergecore.recipes.graph import RecipePlan, Stage, load_recipe
from mergecore.resume import Fingerprint, recipe_fingerprint
from mergecore.units import human_bytes


class RoutingWriter:
    """Sends ``write(name, data)`` to the final output's writer and ``write((stage, name),
    data)`` to that stage's writer (``--keep-intermediates``)."""

    def __init__(self, final: StreamingWriter, stages: dict[str, StreamingWriter]):
        self.final = final
        self.stages = stages

    def write(self, key: str | tuple[str, str], data) -> None:
        if isinstance(key, tuple):
            self.stages[key[0]].write(key[1], data)
        else:
            self.final.write(key, data)

    def direct_phase(self, key: str | tuple[str, str]) -> int | None:
        if isinstance(key, tuple):
            return self.stages[key[0]].direct_phase(key[1])
        return self.final.direct_phase(key)

    def abort(self) -> None:
        for w in [self.final, *self.stages.values()]:
            w.abort()


def describe_recipe(recipe: RecipePlan, options: MergeOptions, *, verbose: int = 0) -> str:
    """The recipe as text: each stage, then the final output's plan and the fused totals."""
    lines = [f"multi-stage recipe: {len(recipe.stages)} stages, fused into one pass"]
    for s in recipe.stages:
        p = s.plan
        lines.append(f"stage {s.title} ({s.label}): {p.method} of {', '.join(p.models)}"
                     f"{f' (base {p.base_model})' if p.base_model else ''}; "
                     f"{len(p.tensors)} tensors, {p.num_layers} layers")
    lines.append("final output:")
    lines += ["  " + line for line in describe_plan(recipe.final.plan, options).splitlines()
              if not line.startswith("read:")]
    inter = sum(n.out_nbytes for t in recipe.tensors for n in t.nodes) - sum(
        t.byte_counts()[1] for t in recipe.tensors)
    kept = (f"written to {options.keep_intermediates}" if options.keep_intermediates
            else "kept in memory only")
    lines.append(f"fused pass: read {human_bytes(recipe.total_input_bytes)} (each input "
                 f"tensor once), write {human_bytes(recipe.total_output_bytes)}; intermediate "
                 f"tensors ({human_bytes(inter)}) {kept}")
    if verbose:
        for t in recipe.tensors:
            lines.append(f"  {t.name} {list(t.shape)} {t.out_dtype} <- {t.expression()}")
    return "\n".join(lines)


def _tokenizer_dir(stage: Stage, by_name: dict[str, Stage]) -> Path | None:
    """Where a stage's tokenizer comes from; a stage used as the donor hands down its own."""
    path = stage.plan.tokenizer_path
    seen: set[str] = set()
    while path in by_name and path not in seen:
        seen.add(path)
        path = by_name[path].plan.tokenizer_path
    return Path(path) if path else None


def _writer(out_dir: Path, plan, options: MergeOptions) -> StreamingWriter:
    entries = [(t.name, t.out_dtype, tuple(t.shape)) for t in plan.tensors]
    return StreamingWriter(out_dir, plan_shards(entries, options.out_shard_size))


def run_recipe(config_path: str | os.PathLike, out_dir: str | os.PathLike,
               options: MergeOptions | None = None) -> MergeResult:
    """Plan and run a multi-stage recipe into ``out_dir`` (see the module docstring)."""
    options = options or MergeOptions()
    out_dir = Path(out_dir)
    text = Path(config_path).read_text(encoding="utf-8")
    keep = Path(options.keep_intermediates) if options.keep_intermediates else None
    if options.resume and keep is not None:
        raise ValueError("--resume cannot be combined with --keep-intermediates (an interrupted "
                         "run keeps no intermediate model); resume without it, or rerun with "
                         "--overwrite")
    try:
        recipe = load_recipe(config_path, random_seed=options.random_seed,
                             allow_crimes=options.allow_crimes,
                             keep_intermediates=keep is not None)
    except ConfigError as exc:
        raise with_output_problems(exc, out_dir, options) from None
    report_warnings(recipe.warnings + budget_warnings(recipe.tensors, options)
                    + tokenizer_warnings(recipe.final.plan, options))
    by_name = {s.name: s for s in recipe.stages if s.name is not None}
    source = _tokenizer_dir(recipe.final, by_name)
    entries = [(t.name, t.out_dtype, tuple(t.shape)) for t in recipe.final.plan.tensors]
    shards = plan_shards(entries, options.out_shard_size)
    fingerprint = recipe_fingerprint(recipe, out_shard_size=options.out_shard_size,
                                     random_seed=options.random_seed, device=options.device)
    with OutputLock(out_dir) as lock:  # held until the output is finalized or abandoned
        return _run_locked(recipe, out_dir, options, lock, text=text, keep=keep,
                           shards=shards, fingerprint=fingerprint, source=source,
                           by_name=by_name, config_path=config_path)


def _run_locked(recipe: RecipePlan, out_dir: Path, options: MergeOptions, lock: OutputLock, *,
                text: str, keep: Path | None, shards, fingerprint: Fingerprint,
                source: Path | None,
                by_name: dict[str, Stage], config_path: str | os.PathLike) -> MergeResult:
    """The output side of ``run_recipe``: checks, then the fused pass (``lock`` held)."""
    if options.dry_run:
        print(describe_recipe(recipe, options, verbose=options.verbose))
        print(describe_budget(recipe, options))
    state = check_output(out_dir, options, shards, fingerprint,
                         input_dirs=input_directories(recipe.tensors),
                         tokenizer_source=source, lock=lock, config_path=config_path,
                         vocab_size=config_vocab_size(recipe.final.plan.output_config),
                         write_tokenizer=writes_tokenizer(recipe.final.plan, options))
    if options.dry_run:
        return MergeResult(out_dir, [], PipelineStats(), recipe)
    if options.num_threads:
        os.environ["MERGECORE_NUM_THREADS"] = str(options.num_threads)
    release_freed_memory_promptly()  # keeps the resident size near the budget
    inter = recipe.stages[:-1] if keep is not None else []
    for d in (keep / s.title for s in inter):
        _prepare_out_dir(d, options.overwrite)
    prepare_output(out_dir, options, shards, state, lock)
    work = recipe
    if state.completed:
        work = dataclasses.replace(recipe, tensors=remaining_tensors(recipe.tensors, shards,
                                                                     state.completed))
    docs = list(yaml.safe_load_all(text))
    progress = _Progress(work.total_input_bytes, options.quiet)
    writers = {s.title: _writer(keep / s.title, s.plan, options) for s in inter}
    pipe_options = PipelineOptions(device=options.device, max_memory=options.max_memory,
                                   random_seed=options.random_seed, progress=progress)
    final = None
    try:
        with TensorReader(nthreads=2, drop_cache=True) as reader, handle_termination():
            final = StreamingWriter(out_dir, shards, manifest_extra=fingerprint.manifest_entries(),
                                    completed=state.completed, keep_complete_on_os_error=True)
            router = RoutingWriter(faults.wrap_writer(final), writers)
            stats = MergePipeline(work, reader, router, pipe_options).run()
            finish_start = time.perf_counter()
            for s in inter:
                names = write_side_files(keep / s.title, s.plan, options,
                                         yaml_text=yaml.safe_dump(docs[s.index], sort_keys=False),
                                         tokenizer_source=_tokenizer_dir(s, by_name))
                writers[s.title].finalize(names)
            names = write_side_files(out_dir, recipe.final.plan, options, yaml_text=text,
                                     tokenizer_source=source,
                                     template_dirs=sorted(input_directories(recipe.tensors)))
            files = final.finalize(names)
            stats.add_finish(time.perf_counter() - finish_start)
    except BaseException as exc:
        for s in inter:
            writers[s.title].abort()  # no-op once finalized
            remove_unfinished_side_files(keep / s.title, writers[s.title],
                                         _tokenizer_dir(s, by_name))
        if final is not None:
            if keeps_progress(exc) and not writers:
                final.suspend()  # keep complete shards and the manifest for --resume
            else:
                final.abort()
            remove_unfinished_side_files(out_dir, final, source)
        raise
    finally:
        progress.close()
    stats.extra["stages"] = len(recipe.stages)
    return MergeResult(out_dir, files, stats, recipe)
