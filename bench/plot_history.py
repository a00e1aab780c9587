"""Draw the history of the benchmark results in bench/results/*.jsonl as a PNG.

    python -m bench.plot_history [--results bench/results] [--out bench/results/history.png]
                                 [--suite kernels-suite] [--device cpu] [--match ties]

One line per (operation, backend, shape, dtype, device): GB/s (median seconds where a row has
no GB/s) against the order of the runs, labelled by commit. Rows of quick runs are left out.
Reads the suites' files and the bench scripts' (kernels-cpu.jsonl, e2e-cpu.jsonl, ...).
Needs matplotlib.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
KEY = ("op", "backend", "shape", "dtype", "device")


def normalize(row: dict, order: int) -> dict:
    """A row of the pytest-benchmark suites as is; a row of the bench scripts (``kernels.py``,
    ``e2e.py``: ``method``/``impl``, ``params``, no date) mapped onto the same key, its
    place in the file standing in for the date."""
    out = dict(row)
    out.setdefault("op", row.get("method"))
    out.setdefault("backend", row.get("impl"))
    out.setdefault("shape", row.get("params"))
    out.setdefault("dtype", "-")
    out["shape"] = str(out["shape"])
    out["order"] = order
    return out


def load(results: Path, suite: str | None) -> list[dict]:
    rows = []
    for path in sorted(results.glob(f"{suite or '*'}.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = normalize(json.loads(line), len(rows))
            if all(row.get(k) is not None for k in KEY) and "commit" in row \
                    and not row.get("quick"):
                rows.append(row)
    return rows


def run_of(row: dict) -> tuple[str, str]:
    """The run a row belongs to: (date, commit); script rows have no date."""
    return row.get("date", ""), row["commit"]


def series(rows: list[dict], device: str | None, match: str | None) -> dict[tuple, list[dict]]:
    lines: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        if device and row["device"] != device:
            continue
        key = tuple(row[k] for k in KEY)
        if match and match not in " ".join(map(str, key)):
            continue
        lines[key].append(row)
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--out", type=Path, default=RESULTS / "history.png")
    p.add_argument("--suite", default=None, help="kernels-suite, e2e-suite ... (default: all)")
    p.add_argument("--device", default=None)
    p.add_argument("--match", default=None, help="keep lines whose key contains this text")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = series(load(args.results, args.suite), args.device, args.match)
    if not lines:
        raise SystemExit(f"no results to draw under {args.results}")
    first: dict[tuple[str, str], int] = {}
    for r in sorted((r for rows in lines.values() for r in rows), key=lambda r: r["order"]):
        first.setdefault(run_of(r), r["order"])
    runs = sorted(first, key=lambda run: (run[0], first[run]))
    position = {run: k for k, run in enumerate(runs)}
    fig, ax = plt.subplots(figsize=(10, 5))
    for k, (key, rows) in enumerate(sorted(lines.items())):
        rows.sort(key=lambda r: position[run_of(r)])
        metric = "gbps" if all(r.get("gbps") for r in rows) else "seconds"
        ax.plot([position[run_of(r)] for r in rows], [r[metric] for r in rows],
                marker="o", linestyle=("-", "--", ":")[k // 10 % 3], label=" ".join(map(str, key)) + ("" if metric == "gbps" else " (s)"))
    ax.set_xticks(range(len(runs)), [f"{c}\n{d[:10]}" for d, c in runs], fontsize=7,
                  rotation=90)
    ax.set_ylabel("GB/s")
    ax.set_title(f"mergecore benchmark history ({len(lines)} series)")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"{len(lines)} series over {len(runs)} runs -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
