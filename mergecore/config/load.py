"""From a YAML file to a validated ``MergePlan``: parse, open the inputs' headers, plan."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergecore.config.errors import ConfigError, Problems
from mergecore.config.schema import (
    MergeConfig,
    ModelRef,
    load_config,
    model_strings,
    parse_model_ref,
    structure_is_complete,
)

if TYPE_CHECKING:
    from mergecore.io.types import Checkpoint
    from mergecore.plan import MergePlan


def open_checkpoints(models: Iterable[ModelRef],
                     problems: Problems | None = None) -> dict[str, Checkpoint]:
    """Open each distinct model path's safetensors headers (no tensor data).

    Returns ``{path: Checkpoint}``. Every model that cannot be opened (missing directory,
    hub id, pickle-only weights, malformed file ...) is a problem: added to ``problems`` when
    given (the caller raises), else raised at once as a ``ConfigError``. A LoRA adapter
    (``path+adapter``) that does not exist or does not fit its model (missing files, unsupported
    features, targets the model lacks, shapes that differ) is a problem too; only headers and
    configs are read.
    """
    from mergecore.io.checkpoint import open_checkpoint

    own = problems is None
    problems = Problems() if problems is None else problems
    out: dict[str, Checkpoint] = {}
    failed: set[str] = set()
    for ref in models:
        if ref.path not in out and ref.path not in failed:
            try:
                out[ref.path] = open_checkpoint(ref.path)
            except (ValueError, OSError) as exc:  # CheckpointError, SafetensorsError
                failed.add(ref.path)
                problems.add(f"model {ref.ref!r}", str(exc))
        for line in adapter_ref_problems(ref, out.get(ref.path)):
            problems.add(f"model {ref.ref!r}", line)
    if own:
        problems.raise_if_any()
    return out


def adapter_ref_problems(ref: ModelRef, checkpoint: Checkpoint | None) -> list[str]:
    """What is wrong with the LoRA adapter of ``ref`` (none without one): a path that does
    not exist, or an adapter that does not fit ``checkpoint`` (not checked when the model did
    not open). Reads headers and configs only."""
    from mergecore.lora import adapter_problems

    if ref.adapter is None:
        return []
    if not Path(ref.adapter).expanduser().exists():
        return [f"LoRA adapter path {ref.adapter!r} does not exist"]
    return adapter_problems(ref.adapter, checkpoint) if checkpoint is not None else []


def input_problems(parsed: list[tuple[Any, MergeConfig | None]], *,
                   allow_crimes: bool = False) -> Problems:
    """The problems of the inputs named by YAML documents that have problems of their own.

    ``parsed`` is ``parse_documents_leniently``'s list of (YAML document, config). Opens the
    headers of every model the documents name (stage names of a recipe excepted): missing
    directories, pickle-only or malformed checkpoints, LoRA adapters that do not fit. Then
    plans each document whose model list survived the check intact
    (``structure_is_complete``), in stage order (a document that uses a stage is planned
    against what that stage would output, when that is known: the stage planned, or failed
    only on parameters, ``shape_plan``), leaving out the models that did not open, and adds
    what the planner finds in the headers: shapes that differ, missing tensors, layer counts,
    layer_range bounds, and the values of the parameters that resolve (a density that keeps
    nothing). Parameters that do not resolve are left to the YAML check. Reads no tensor
    data.
    """
    from mergecore.config.schema import document_label, stage_order
    from mergecore.plan import build_plan, shape_plan, structure_problems
    from mergecore.recipes.graph import stage_checkpoint

    stages = {c.name for _, c in parsed if c is not None and c.name is not None}
    refs: list[ModelRef] = []
    for text_ref in dict.fromkeys(s for raw, _ in parsed for s in model_strings(raw)):
        try:
            ref = parse_model_ref(text_ref)
        except ValueError:
            continue  # the YAML's own problems already say so
        if ref.path not in stages:
            refs.append(ref)
    problems = Problems()
    checkpoints = open_checkpoints(refs, problems)
    configs = [c for _, c in parsed if c is not None]
    raw_of = {id(c): raw for raw, c in parsed if c is not None}
    unnamed = sum(c is None or c.name is None for _, c in parsed)
    labels = {id(c): document_label(i, c.name, final=unnamed == 1)
              for i, (_, c) in enumerate(parsed) if c is not None}
    try:
        ordered = stage_order(configs)
    except (ConfigError, KeyError):  # a cycle or a repeated name: the YAML check says so
        ordered = [c for c in configs if not any(r.path in stages for r in c.models_to_open())]

    stage_plans: dict[str, MergePlan] = {}
    for cfg in ordered:
        if not structure_is_complete(raw_of[id(cfg)], cfg):
            continue
        used = [ref for ref in cfg.models_to_open() if ref.path in stages]
        if any(ref.path not in stage_plans or ref.adapter is not None for ref in used):
            continue  # uses a stage that could not be planned: checked once that one is fixed
        known = dict(checkpoints)
        for ref in used:
            known[ref.path] = stage_checkpoint(ref.path, stage_plans[ref.path])
        for line in structure_problems(cfg, known, allow_crimes=allow_crimes):
            problems.add(labels[id(cfg)] if len(parsed) > 1 else None, line)
        if cfg.name is not None and all(ref.path in known for ref in cfg.models_to_open()):
            try:  # what later documents see of this stage
                plan = build_plan(cfg, known, allow_crimes=allow_crimes)
            except (ValueError, TypeError, KeyError, AttributeError):  # ConfigError included:
                # its problems are reported above or by the YAML check; when they are only
                # parameters that do not resolve, its output is known all the same
                plan = shape_plan(cfg, known, allow_crimes=allow_crimes)
                if plan is None:
                    continue
            stage_plans[cfg.name] = plan
    return problems


def load_merge(config_path: str | os.PathLike, *, random_seed: int | None = None,
               allow_crimes: bool = False, out_dtype: str | None = None) -> MergePlan:
    """Parse ``config_path``, open every input's headers and build the plan.

    Every problem (in the YAML, in the checkpoints, in the plan) is raised as one
    ``ConfigError`` that names the file. A multi-stage recipe (several documents) is parsed
    and checked, then refused: running it is not supported yet.
    """
    from mergecore.plan import build_plan, structure_problems

    source = os.fspath(config_path)
    docs = load_config(config_path, allow_crimes=allow_crimes)
    if len(docs) > 1:
        names = ", ".join(d.name or "(final)" for d in docs)
        raise ConfigError([(f"multi-stage recipes ({len(docs)} documents: {names}) are not "
                           "supported by mergecore yet; run each stage as its own merge")],
                          source=source)
    config = docs[0]
    problems = Problems()
    checkpoints = open_checkpoints(config.models_to_open(), problems)
    if problems:  # also list what the models that did open show (one run, every problem)
        problems.extend(structure_problems(config, checkpoints, allow_crimes=allow_crimes,
                                           report_parameters=True))
    problems.raise_if_any(source)
    try:
        return build_plan(config, checkpoints, out_dtype=out_dtype, random_seed=random_seed,
                          allow_crimes=allow_crimes)
    except ConfigError as exc:
        raise ConfigError(exc.problems, source=source) from None
