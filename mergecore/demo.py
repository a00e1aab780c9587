"""``mergecore demo``: generate small example models locally, merge them, check the result.

Builds a family of small LLaMA-shaped checkpoints (a base and two fine-tunes, bf16), runs
a TIES merge and a SLERP merge with a per-layer gradient through the same path as
``mergecore merge``, loads each output with transformers, runs a forward pass, and prints
what was merged, the bytes read and written, the time and the throughput.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

DEMO_RECIPES = {
    "ties": """\
merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.6, density: 0.3}}
parameters:
  normalize: true
dtype: bfloat16
""",
    "slerp-gradient": """\
merge_method: slerp
base_model: {base}
slices:
  - sources:
      - model: {base}
        layer_range: [0, {layers}]
      - model: {ft1}
        layer_range: [0, {layers}]
parameters:
  t:
    - filter: self_attn
      value: [0.0, 0.5, 0.3, 0.7, 1.0]
    - filter: mlp
      value: [1.0, 0.5, 0.7, 0.3, 0.0]
    - value: 0.5
dtype: bfloat16
""",
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


def run_demo(directory: str | None = None, *, quiet: bool = False, layers: int = 4,
             hidden: int = 256) -> int:
    """Generate, merge, verify; returns a process exit status."""
    from mergecore.merge import MergeOptions, run_merge
    from mergecore.synthetic import make_family
    from mergecore.units import human_bytes

    work = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="mergecore-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    models = make_family(work / "models", arch="llama", n_models=3, hidden=hidden,
                         layers=layers, vocab=512)
    base, ft1, ft2 = (str(p) for p in models)
    say = (lambda *a: None) if quiet else print
    say(f"generated a base and 2 fine-tunes ({layers} layers, hidden {hidden}, bf16) "
        f"in {time.perf_counter() - start:.1f} s under {work / 'models'}")
    rows = []
    for name, template in DEMO_RECIPES.items():
        config = work / f"{name}.yml"
        config.write_text(template.format(base=base, ft1=ft1, ft2=ft2, layers=layers))
        out_dir = work / f"merged-{name}"
        result = run_merge(config, out_dir, MergeOptions(overwrite=True, quiet=True,
                                                         random_seed=0))
        peak = _check_loads(out_dir)
        s = result.stats
        rows.append((name, s.tensors, s.bytes_read, s.bytes_written, s.wall, peak, out_dir))
    say("")
    say(f"{'recipe':16} {'tensors':>7} {'read':>10} {'written':>10} {'time':>7} {'GB/s in':>8}"
        "  loads with transformers")
    for name, tensors, read, written, wall, peak, out_dir in rows:
        say(f"{name:16} {tensors:7d} {human_bytes(read):>10} {human_bytes(written):>10} "
            f"{wall:6.2f}s {read / wall / 1e9 if wall else 0:8.2f}  yes (max |logit| {peak:.2f})"
            f" -> {out_dir}")
    return 0
