"""Planning a multi-stage recipe: each stage planned as if run alone, then fused per tensor.

A recipe (mergekit-multi's format) is several YAML documents; a document may use an earlier
document's ``name`` as a model. The final output is the one document without a ``name:``
(the last document when every document is named).

Planning, before any tensor data is read:

1. The stages are planned in dependency order with the ordinary planner
   (``mergecore.plan.build_plan``). A stage that is used as a model by a later stage is
   presented to that stage as a *virtual checkpoint*: the header its output would have
   (names, shapes, output dtypes) and the config.json it would get. So every stage's
   parameters (gradients over its own layer count, slices, filters, vocabulary rules) resolve
   exactly as when the stage is run alone on the written intermediate.
2. Each output tensor of the final stage becomes a ``FusedTensor``: an expression graph whose
   leaves are tensors of the original input files (``PlannedInput``, with their ``adapter``)
   and whose nodes are stage tensors (a ``PlannedTensor`` of that stage's plan, i.e. a merge
   method with its resolved parameters). A stage tensor used twice in one graph is one node;
   an input tensor used by several stages is one leaf, read once.

Every problem (unknown model, shape mismatch between a stage and its user, missing
parameter ...) is collected, prefixed with the document it belongs to, and raised at once.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mergecore.config.errors import ConfigError, Problems
from mergecore.config.load import adapter_ref_problems, open_checkpoints
from mergecore.config.schema import (
    MergeConfig,
    ModelRef,
    document_label,
    load_config,
    stage_dependencies,
)
from mergecore.io.types import Checkpoint, TensorInfo
from mergecore.plan import (
    MergePlan,
    PlannedInput,
    PlannedTensor,
    build_plan,
    distinct_input_bytes,
    shape_plan,
    structure_problems,
)

#: The root of the made-up file paths of virtual (intermediate) checkpoints.
STAGE_FILE_ROOT = Path("<mergecore-stage>")


# ----- records ---------------------------------------------------------------------------------


@dataclass
class Stage:
    """One document of the recipe, planned. ``name`` is None for the unnamed final document;
    ``label`` says where it is in the file (``document 2 (name: comp2)``)."""

    name: str | None
    label: str
    config: MergeConfig
    plan: MergePlan
    index: int = 0  # position of the document in the file

    @property
    def title(self) -> str:
        return self.name or "final"


@dataclass(frozen=True)
class NodeArg:
    """One input of a node: ``FusedTensor.inputs[index]`` when ``kind == "input"``, else the
    result of ``FusedTensor.nodes[index]``; only its first ``rows`` rows when not None (the
    common vocabulary)."""

    kind: str  # "input" or "node"
    index: int
    rows: int | None = None


@dataclass
class StageNode:
    """One stage tensor inside a graph: ``planned`` (from the stage's own plan) applied to
    ``args`` (one per ``planned.inputs`` entry). ``depth``: 1 + the deepest node it uses."""

    stage: str
    planned: PlannedTensor
    args: list[NodeArg]
    depth: int
    seed: int

    @property
    def out_nbytes(self) -> int:
        return self.planned.out_nbytes


@dataclass
class FusedTensor:
    """Everything computed from one read of a set of input tensors.

    ``inputs``: the leaves (original input tensors, each once). ``nodes``: in an order where each node follows the nodes it uses. ``outputs``:
    ``(destination, node index)``; destination None is the recipe's output, a stage name is
    that stage's intermediate model (``--keep-intermediates``). ``name`` is the first
    output's tensor name (for messages).
    """

    name: str
    inputs: list[PlannedInput]
    nodes: list[StageNode]
    outputs: list[tuple[str | None, int]]
    method: str = "fused"

    def write_key(self, destination: str | None, node: int) -> str | tuple[str, str]:
        """The key a routing writer understands: the tensor name for the final output,
        ``(stage, name)`` for an intermediate."""
        name = self.nodes[node].planned.name
        return name if destination is None else (destination, name)

    def byte_counts(self) -> tuple[int, int]:
        """(bytes held until computed: leaves + unwritten intermediates, bytes written)."""
        held = distinct_input_bytes(self.inputs)
        written_nodes = {k for _, k in self.outputs}
        held += sum(n.out_nbytes for k, n in enumerate(self.nodes) if k not in written_nodes)
        written = sum(self.nodes[k].out_nbytes for _, k in self.outputs)
        return held, written

    @property
    def shape(self) -> tuple[int, ...]:
        return self.nodes[self.outputs[0][1]].planned.shape

    @property
    def out_dtype(self) -> str:
        return self.nodes[self.outputs[0][1]].planned.out_dtype

    @property
    def numel(self) -> int:
        return self.nodes[self.outputs[0][1]].planned.numel

    def expression(self, node: int | None = None) -> str:
        """The graph as text, e.g. ``slerp[final](slerp[c1](a, b), slerp[c2](b, c))``."""
        k = self.outputs[0][1] if node is None else node
        n = self.nodes[k]
        parts = []
        for arg in n.args:
            if arg.kind == "input":
                parts.append(Path(self.inputs[arg.index].model).name)
            else:
                parts.append(self.expression(arg.index))
        return f"{n.planned.method}[{n.stage}]({', '.join(parts)})"


@dataclass
class RecipePlan:
    """A validated multi-stage recipe: its stages (dependency order, final last) and the
    fused work items (``tensors``: the final output's tensors in output order, then items that
    only feed kept intermediates)."""

    stages: list[Stage]
    tensors: list[FusedTensor]
    source: str | None = None
    keep_intermediates: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    @property
    def total_input_bytes(self) -> int:
        """Bytes of original input tensors read (each distinct tensor once per item)."""
        return sum(distinct_input_bytes(t.inputs) for t in self.tensors)

    @property
    def total_output_bytes(self) -> int:
        return sum(t.byte_counts()[1] for t in self.tensors)


# ----- virtual checkpoints -----------------------------------------------------------------------


def stage_file(name: str) -> Path:
    """The made-up file path that the virtual checkpoint of stage ``name`` points into."""
    return STAGE_FILE_ROOT / name


def stage_checkpoint(name: str, plan: MergePlan) -> Checkpoint:
    """The checkpoint stage ``name``'s output would be, as far as a planner can see: every
    planned tensor with its output dtype and shape, and the output config.json. Tensor ``k``
    sits at "offset" ``k`` of :func:`stage_file` (a key, never read)."""
    tensors = {
        t.name: TensorInfo(name=t.name, dtype=t.out_dtype, shape=tuple(t.shape),
                           file=stage_file(name), data_start=k, nbytes=t.out_nbytes)
        for k, t in enumerate(plan.tensors)
    }
    return Checkpoint(path=stage_file(name), tensors=tensors, config=plan.output_config)


# ----- planning the stages -----------------------------------------------------------------------


def _labels(configs: list[MergeConfig]) -> dict[str | None, str]:
    return {c.name: document_label(i, c.name) for i, c in enumerate(configs)}


def final_document(configs: list[MergeConfig]) -> MergeConfig:
    """The output of a recipe: the unnamed document, else the last one."""
    unnamed = [c for c in configs if c.name is None]
    return unnamed[0] if unnamed else configs[-1]


def needed_stages(configs: list[MergeConfig]) -> list[MergeConfig]:
    """The documents the final output depends on (itself included), in dependency order."""
    deps = stage_dependencies(configs)
    by_name = {c.name: c for c in configs}
    order: list[MergeConfig] = []
    done: set[str | None] = set()

    def visit(name: str | None) -> None:
        if name in done:
            return
        done.add(name)
        for dep in deps[name]:
            visit(dep)
        order.append(by_name[name])

    visit(final_document(configs).name)
    return order


class _StagePlanner:
    def __init__(self, configs: list[MergeConfig], *, random_seed: int | None,
                 allow_crimes: bool, out_dtype: str | None):
        self.configs = configs
        self.names = {c.name for c in configs if c.name is not None}
        self.labels = _labels(configs)
        self.random_seed = random_seed
        self.allow_crimes = allow_crimes
        self.out_dtype = out_dtype
        self.problems = Problems()
        self.opened: dict[str, Checkpoint] = {}
        self.failed: set[str] = set()  # stages that could not be planned
        self.adapters_checked: set[tuple[str, str]] = set()  # (model path, adapter)
        # failed stages whose output is known all the same (only parameters missing): later
        # documents are checked against it
        self.shapes: dict[str, MergePlan] = {}

    def _stage_refs(self, cfg: MergeConfig) -> tuple[list[ModelRef], list[ModelRef]]:
        """(references to other stages, references to model directories)."""
        stages, files = [], []
        for ref in cfg.models_to_open():
            (stages if ref.path in self.names else files).append(ref)
        return stages, files

    def _open(self, label: str, refs: list[ModelRef]) -> bool:
        todo = [r for r in refs if r.path not in self.opened]
        local = Problems()
        self.opened.update(open_checkpoints(todo, local))
        for line in local:
            hint = ""
            if any(f"{r.ref!r}" in line and "/" not in r.path and os.sep not in r.path
                   for r in todo):
                hint = (" (no stage of this recipe has that name; stages: "
                        + ", ".join(sorted(self.names)) + ")") if self.names else ""
            self.problems.add(label, line + hint)
        ok = not local
        self.adapters_checked.update((r.path, r.adapter) for r in todo if r.adapter)
        for r in refs:  # adapters on models already opened for an earlier document
            if (r in todo or r.adapter is None or r.path not in self.opened
                    or (r.path, r.adapter) in self.adapters_checked):
                continue
            self.adapters_checked.add((r.path, r.adapter))
            for line in adapter_ref_problems(r, self.opened[r.path]):
                self.problems.add(label, f"model {r.ref!r}: {line}")
                ok = False
        return ok

    def plan(self, cfg: MergeConfig, plans: Mapping[str, MergePlan],
             final: bool) -> MergePlan | None:
        label = self.labels[cfg.name]
        stage_refs, file_refs = self._stage_refs(cfg)
        inputs_ok = self._open(label, file_refs)
        stages_ok = True
        for ref in stage_refs:
            if ref.adapter is not None:
                self.problems.add(label, f"model {ref.ref!r}: a LoRA adapter on the "
                                  f"intermediate stage {ref.path!r} is not supported (apply "
                                  "it to that stage's inputs instead)")
                stages_ok = False
            if ref.path in self.failed and ref.path not in self.shapes:
                stages_ok = False  # its problems are reported under its own document
        checkpoints = {r.path: self.opened[r.path] for r in file_refs if r.path in self.opened}
        if stages_ok:
            for ref in stage_refs:
                checkpoints[ref.path] = stage_checkpoint(
                    ref.path, plans[ref.path] if ref.path in plans else self.shapes[ref.path])
        if not (inputs_ok and stages_ok):
            if stages_ok:  # some inputs did not open: check what the others show
                for line in structure_problems(cfg, checkpoints,
                                               allow_crimes=self.allow_crimes,
                                               report_parameters=True):
                    self.problems.add(label, line)
            self.failed.add(cfg.name)
            return None
        try:
            return build_plan(cfg, checkpoints, out_dtype=self.out_dtype if final else None,
                              random_seed=self.random_seed, allow_crimes=self.allow_crimes)
        except ConfigError as exc:
            for line in exc.problems:
                self.problems.add(label, line)
            self.failed.add(cfg.name)
            if cfg.name is not None:
                shape = shape_plan(cfg, checkpoints, allow_crimes=self.allow_crimes)
                if shape is not None:
                    self.shapes[cfg.name] = shape
            return None


def plan_stages(configs: list[MergeConfig], *, source: str | None = None,
                random_seed: int | None = None, allow_crimes: bool = False,
                out_dtype: str | None = None) -> tuple[list[Stage], list[str]]:
    """Plan every document the final output needs, each as if run alone (see the module
    docstring). Returns the stages in dependency order (final last) and warnings. Raises one
    ``ConfigError`` naming ``source`` with every problem, each prefixed by its document."""
    planner = _StagePlanner(configs, random_seed=random_seed, allow_crimes=allow_crimes,
                            out_dtype=out_dtype)
    final = final_document(configs)
    needed = needed_stages(configs)
    warnings = [f"{planner.labels[c.name]} is not used by the final output: not computed"
                for c in configs if c not in needed]
    plans: dict[str, MergePlan] = {}
    stages: list[Stage] = []
    for cfg in needed:
        plan = planner.plan(cfg, plans, final=cfg is final)
        if plan is None:
            continue
        if cfg.name is not None:
            plans[cfg.name] = plan
        stages.append(Stage(cfg.name, planner.labels[cfg.name], cfg, plan,
                            index=configs.index(cfg)))
    planner.problems.raise_if_any(source)
    return stages, warnings


# ----- fusing per tensor -------------------------------------------------------------------------


class _GraphBuilder:
    """Builds one ``FusedTensor``: leaves and nodes, each stage tensor and input tensor once."""

    def __init__(self, stage_tensors: Mapping[str, Mapping[str, PlannedTensor]],
                 seeds: Mapping[str, int]):
        self.stage_tensors = stage_tensors
        self.seeds = seeds
        self.leaves: list[PlannedInput] = []
        self.leaf_slots: dict[tuple, int] = {}
        self.nodes: list[StageNode] = []
        self.node_index: dict[tuple[str, str], int] = {}

    def leaf(self, inp: PlannedInput) -> int:
        key = (inp.model, str(inp.info.file), inp.info.data_start)
        if key not in self.leaf_slots:
            self.leaf_slots[key] = len(self.leaves)
            self.leaves.append(PlannedInput(inp.model, inp.info, inp.adapter, None))
        return self.leaf_slots[key]

    def node(self, stage: str, planned: PlannedTensor) -> int:
        key = (stage, planned.name)
        if key in self.node_index:
            return self.node_index[key]
        args: list[NodeArg] = []
        depth = 1
        for inp in planned.inputs:
            if inp.info.file.parent == STAGE_FILE_ROOT:
                producer = inp.info.file.name
                k = self.node(producer, self.stage_tensors[producer][inp.info.name])
                depth = max(depth, self.nodes[k].depth + 1)
                args.append(NodeArg("node", k, inp.rows))
            else:
                args.append(NodeArg("input", self.leaf(inp), inp.rows))
        self.node_index[key] = len(self.nodes)
        self.nodes.append(StageNode(stage, planned, args, depth, self.seeds[stage]))
        return len(self.nodes) - 1

    def build(self, outputs: list[tuple[str | None, int]]) -> FusedTensor:
        name = self.nodes[outputs[0][1]].planned.name
        return FusedTensor(name=name, inputs=self.leaves, nodes=self.nodes, outputs=outputs)


def fuse(stages: list[Stage], *, keep_intermediates: bool = False) -> list[FusedTensor]:
    """One ``FusedTensor`` per output tensor of the final stage, in output order. With
    ``keep_intermediates``, every stage tensor is also an output of the first item that
    computes it, and stage tensors the final output does not use get items of their own."""
    stage_tensors = {s.title: {t.name: t for t in s.plan.tensors} for s in stages}
    seeds = {s.title: s.plan.random_seed or 0 for s in stages}
    final = stages[-1]
    items: list[FusedTensor] = []
    written: set[tuple[str, str]] = set()

    def add(builder: _GraphBuilder, root: int | None) -> None:
        outputs: list[tuple[str | None, int]] = [] if root is None else [(None, root)]
        if keep_intermediates:
            for k, node in enumerate(builder.nodes):
                key = (node.stage, node.planned.name)
                if node.stage != final.title and key not in written:
                    written.add(key)
                    outputs.append((node.stage, k))
        if outputs:
            items.append(builder.build(outputs))

    for t in final.plan.tensors:
        builder = _GraphBuilder(stage_tensors, seeds)
        add(builder, builder.node(final.title, t))
    if keep_intermediates:
        for s in stages[:-1]:
            for t in s.plan.tensors:
                if (s.title, t.name) not in written:
                    builder = _GraphBuilder(stage_tensors, seeds)
                    builder.node(s.title, t)
                    add(builder, None)
    return items


def plan_recipe(configs: list[MergeConfig], *, source: str | None = None,
                random_seed: int | None = None, allow_crimes: bool = False,
                out_dtype: str | None = None, keep_intermediates: bool = False) -> RecipePlan:
    """Plan and fuse a recipe (see the module docstring); reads no tensor data."""
    stages, warnings = plan_stages(configs, source=source, random_seed=random_seed,
                                   allow_crimes=allow_crimes, out_dtype=out_dtype)
    for s in stages:
        warnings.extend(f"{s.label}: {w}" for w in s.plan.warnings)
    return RecipePlan(stages=stages, tensors=fuse(stages, keep_intermediates=keep_intermediates),
                      source=source, keep_intermediates=keep_intermediates, warnings=warnings)


def is_recipe(config_path: str | os.PathLike) -> bool:
    """True when the file holds several merge documents (a mergekit-multi recipe). A file
    that does not parse is left to the single-merge path, which reports its problems."""
    try:
        return len(load_config(config_path, check_inputs=False)) > 1
    except ConfigError:
        return False


def load_recipe(config_path: str | os.PathLike, *, random_seed: int | None = None,
                allow_crimes: bool = False, out_dtype: str | None = None,
                keep_intermediates: bool = False) -> RecipePlan:
    """Parse a recipe file, open every input's headers and plan it (``plan_recipe``)."""
    source = os.fspath(config_path)
    return plan_recipe(load_config(config_path, allow_crimes=allow_crimes), source=source, random_seed=random_seed,
                       allow_crimes=allow_crimes, out_dtype=out_dtype,
                       keep_intermediates=keep_intermediates)
