"""``mergecore demo``: generate small example models locally and run the two seed recipes.

Builds a family of small LLaMA-shaped checkpoints (a base and six fine-tunes, bf16) and two
LoRA adapters in PEFT's layout, then runs, through the same path as ``mergecore merge``:

- ``lzlv``: the lzlv_70B recipe in miniature: two SLERP-gradient components of three
  fine-tunes and a midpoint SLERP of the two, fused into one pass (components in memory);
- ``stheno``: the Stheno-L2-13B recipe in miniature: two TIES merges of three fine-tunes
  each, three of the six inputs with a LoRA adapter applied on the fly, blended by a
  BlockMerge_Gradient stage.

Each output is loaded with transformers and run forward once; a table says what was merged,
the bytes read and written, the time and the input throughput.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path

LZLV = """\
name: component-1
merge_method: slerp
base_model: {ft1}
models:
  - model: {ft1}
  - model: {ft2}
parameters:
  t: [0.25, 0.3, 0.5]
dtype: bfloat16
---
name: component-2
merge_method: slerp
base_model: {ft2}
models:
  - model: {ft2}
  - model: {ft3}
parameters:
  t: [0.4, 0.3, 0.25]
dtype: bfloat16
---
merge_method: slerp
base_model: component-1
models:
  - model: component-1
  - model: component-2
parameters:
  t: 0.5
dtype: bfloat16
"""

STHENO = """\
name: stheno-p1
merge_method: ties
base_model: {base}
models:
  - model: {ft1}+{lora1}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {ft2}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {ft3}+{lora1}
    parameters: {{weight: 1.0, density: 0.5}}
parameters:
  normalize: true
dtype: bfloat16
---
name: stheno-p2
merge_method: ties
base_model: {base}
models:
  - model: {ft4}+{lora2}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {ft5}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {ft6}
    parameters: {{weight: 1.0, density: 0.5}}
parameters:
  normalize: true
dtype: bfloat16
---
model_path1: stheno-p1
model_path2: stheno-p2
operations:
  - operation: lm_head
    filter: lm_head
    gradient_values: [0.75]
  - operation: embed_tokens
    filter: embed_tokens
    gradient_values: [0.75]
  - operation: self_attn
    filter: self_attn
    gradient_values: [0.75, 0.25]
  - operation: mlp
    filter: mlp
    gradient_values: [0.25, 0.75]
  - operation: layernorm
    filter: layernorm
    gradient_values: [0.5, 0.5]
  - operation: modelnorm
    filter: model.norm
    gradient_values: [0.75]
"""

DEMO_RECIPES = {"lzlv": LZLV, "stheno": STHENO}
DESCRIPTIONS = {
    "lzlv": "SLERP(SLERP-gradient(ft1, ft2), SLERP-gradient(ft2, ft3)), one fused pass",
    "stheno": "BlockMerge(TIES(ft1+lora1, ft2, ft3+lora1), TIES(ft4+lora2, ft5, ft6))",
}


def _check_loads(out_dir: Path) -> float:
    """Load the merged model with transformers and return the max |logit| of a forward pass."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.arange(8).unsqueeze(0)).logits
    if not torch.isfinite(logits).all():
        raise RuntimeError(f"the merged model in {out_dir} gives non-finite logits")
    return float(logits.abs().max())


#: The file that marks a directory as the demo's own (a rerun may replace what is in it).
DEMO_MARKER = ".mergecore-demo"


def _claim_directory(work: Path) -> None:
    """Make ``work`` the demo's directory: absent, empty, or a directory an earlier demo run
    made (its marker file is there). Anything else is refused before anything is written:
    the demo replaces the models, adapters, YAML files and outputs it writes."""
    if work.exists() and not work.is_dir():
        raise ValueError(f"demo directory {str(work)!r} is not a directory")
    if work.is_dir() and any(work.iterdir()) and not (work / DEMO_MARKER).is_file():
        raise ValueError(f"demo directory {str(work)!r} is not empty and was not made by "
                         "`mergecore demo` (the demo replaces what it writes there); give an "
                         "empty or new directory")
    work.mkdir(parents=True, exist_ok=True)
    (work / DEMO_MARKER).write_text("made by `mergecore demo`; a rerun replaces this "
                                    "directory's models, adapters, recipes and outputs\n")


def run_demo(directory: str | None = None, *, quiet: bool = False, layers: int = 4,
             hidden: int = 256) -> int:
    """Generate, merge, verify; returns a process exit status."""
    from transformers.utils import logging as hf_logging

    from mergecore.merge import MergeOptions, run_merge
    from mergecore.synthetic import make_family, make_lora_adapter
    from mergecore.units import human_bytes

    hf_logging.disable_progress_bar()
    work = (Path(directory) if directory
            else Path(tempfile.mkdtemp(prefix="mergecore-demo-"))).absolute()
    _claim_directory(work)
    say = (lambda *a: None) if quiet else print
    start = time.perf_counter()
    models = make_family(work / "models", arch="llama", n_models=7, hidden=hidden,
                         layers=layers, vocab=512)
    paths = {"base": str(models[0])} | {f"ft{i}": str(p) for i, p in enumerate(models[1:], 1)}
    with warnings.catch_warnings():  # transformers' deprecation notes, raised inside PEFT
        warnings.simplefilter("ignore", FutureWarning)
        for k, targets in ((1, ("q_proj", "v_proj")), (2, ("q_proj", "k_proj", "down_proj"))):
            paths[f"lora{k}"] = str(make_lora_adapter(models[0], work / "adapters" / f"lora{k}",
                                                      target_modules=targets, seed=k))
    say(f"generated a base, 6 fine-tunes ({layers} layers, hidden {hidden}, bf16) and 2 LoRA "
        f"adapters in {time.perf_counter() - start:.1f} s under {work}")
    rows = []
    for name, template in DEMO_RECIPES.items():
        config = work / f"{name}.yml"
        config.write_text(template.format(**paths))
        out_dir = work / f"merged-{name}"
        result = run_merge(config, out_dir, MergeOptions(overwrite=True, quiet=True,
                                                         random_seed=0))
        peak = _check_loads(out_dir)
        s = result.stats
        rows.append((name, s.tensors, s.bytes_read, s.bytes_written, s.wall, peak, out_dir))
    say("")
    say(f"{'recipe':8} {'tensors':>7} {'read':>10} {'written':>10} {'time':>7} {'GB/s in':>8}"
        "  loads with transformers")
    for name, tensors, read, written, wall, peak, out_dir in rows:
        say(f"{name}: {DESCRIPTIONS[name]}")
        say(f"{'':8} {tensors:7d} {human_bytes(read):>10} {human_bytes(written):>10} "
            f"{wall:6.2f}s {read / wall / 1e9 if wall else 0:8.2f}  yes (max |logit| {peak:.2f})"
            f" -> {out_dir}")
    return 0
