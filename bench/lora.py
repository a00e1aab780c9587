"""What a LoRA input costs: applied on the fly vs merged into a copy on disk first.

    python -m bench.lora [--hidden 1024] [--layers 8] [--rank 16] [--device cpu]

Generates a small LLaMA family (base, ft1, ft2) and a rank-``r`` adapter on every linear
module of each layer, then times, in one run:

- ``plain``: ``ties`` of ft1 and ft2 over the base, no adapter (the floor);
- ``on_the_fly``: the same merge with ``ft1+adapter`` (mergecore computes each update as the
  tensor is read);
- ``merged_copy``: what mergekit does with ``path+adapter``: PEFT loads ft1, applies the
  adapter with ``merge_and_unload`` and saves the merged model to disk (timed separately as
  ``peft_merge_save``), then the merge reads that copy.

Bytes read and written are counted by the merge pipeline, plus the merged copy's size for
``merged_copy``. Results: a table, and JSON lines appended to bench/results/lora.jsonl.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import append_results, device_name, git_commit, print_table


def _ties(ft1: str, base: Path, ft2: Path) -> dict:
    return {"merge_method": "ties", "base_model": str(base), "dtype": "bfloat16",
            "models": [{"model": ft1, "parameters": {"weight": 1.0, "density": 0.5}},
                       {"model": str(ft2), "parameters": {"weight": 0.5, "density": 0.3}}]}


def _run(cfg: dict, root: Path, name: str, device: str) -> dict:
    from mergecore.merge import MergeOptions, run_merge

    path = root / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    start = time.perf_counter()
    result = run_merge(path, root / f"out-{name}",
                       MergeOptions(device=device, quiet=True, overwrite=True))
    wall = time.perf_counter() - start
    return {"case": name, "wall_s": wall, "read_MB": result.stats.bytes_read / 1e6,
            "written_MB": result.stats.bytes_written / 1e6}


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    args = ap.parse_args()

    import torch
    import transformers
    from peft import PeftModel

    from mergecore.synthetic import make_family, make_lora_adapter

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        base, ft1, ft2 = make_family(root / "fam", n_models=3, hidden=args.hidden,
                                     layers=args.layers, vocab=args.vocab, dtype="bfloat16")
        adapter = make_lora_adapter(base, root / "adapter", r=args.rank, alpha=2 * args.rank,
                                    target_modules=("q_proj", "k_proj", "v_proj", "o_proj",
                                                    "gate_proj", "up_proj", "down_proj"))
        rows = [_run(_ties(str(ft1), base, ft2), root, "plain", args.device),
                _run(_ties(f"{ft1}+{adapter}", base, ft2), root, "on_the_fly", args.device)]

        start = time.perf_counter()
        model = transformers.LlamaForCausalLM.from_pretrained(ft1, dtype=torch.bfloat16)
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        merged.save_pretrained(root / "ft1-merged")
        copy_wall = time.perf_counter() - start
        copy_bytes = _dir_bytes(root / "ft1-merged")
        row = _run(_ties(str(root / "ft1-merged"), base, ft2), root, "merged_copy", args.device)
        row["peft_merge_save_s"] = copy_wall
        row["wall_s"] += copy_wall
        row["read_MB"] += _dir_bytes(ft1) / 1e6  # PEFT read ft1 to build the copy
        row["written_MB"] += copy_bytes / 1e6
        rows.append(row)

    meta = {"commit": git_commit(), "device": device_name(args.device), "hidden": args.hidden,
            "layers": args.layers, "vocab": args.vocab, "rank": args.rank}
    rows = [{**meta, **r} for r in rows]
    print_table(rows, ["case", "wall_s", "read_MB", "written_MB", "peft_merge_save_s"])
    append_results("lora.jsonl", rows)


if __name__ == "__main__":
    main()
