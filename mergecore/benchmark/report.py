"""Presenting a benchmark: a text table for the terminal, a JSON file, a PNG chart."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def fmt(value: Any) -> str:
    """Numbers with 3 significant digits (integers above 100), empty for None."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return "" if value is None else str(value)


def pct(value: float | None) -> str:
    """A fraction as a percentage for the terminal (one decimal below 10%), empty for None."""
    if value is None:
        return ""
    percent = 100 * value
    return f"{percent:.1f}%" if abs(percent) < 10 else f"{percent:.0f}%"


def format_table(rows: list[dict[str, Any]], columns: list[str],
                 headers: dict[str, str] | None = None) -> str:
    """Left-aligned columns; ``headers`` renames columns."""
    headers = headers or {}
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    titles = [headers.get(c, c) for c in columns]
    widths = [max([len(t)] + [len(row[k]) for row in cells]) for k, t in enumerate(titles)]
    lines = ["  ".join(t.ljust(w) for t, w in zip(titles, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def _roof_rows(roofs: dict[str, Any]) -> list[dict[str, Any]]:
    labels = [("memcpy_gbps", "memcpy (read+write)", None),
              ("file_write_gbps", "file write + fsync", None),
              ("file_read_cold_gbps", "file read, cold", "file_read_cold_cached_share"),
              ("file_read_warm_gbps", "file read, warm", "file_read_warm_cached_share"),
              ("file_write_direct_gbps", "file write + fsync, direct", None),
              ("file_read_direct_gbps", "file read, direct", None),
              ("h2d_pinned_gbps", "H2D (pinned)", None),
              ("d2h_pinned_gbps", "D2H (pinned)", None),
              ("d2d_copy_gbps", "D2D copy (read+write)", None)]
    rows = []
    for key, label, cached in labels:
        if key in roofs:
            rows.append({"roof": label, "GB/s": roofs[key],
                         "page cache before": pct(roofs.get(cached)) if cached else ""})
    return rows


def _stage_rows(run: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"stage": name, "seconds": st["seconds"], "GB": st["bytes"] / 1e9,
             "GB/s": st["gbps"], "roof": st["roof"], "roof GB/s": st["roof_gbps"],
             "of roof": pct(st["roof_share"])} for name, st in run["stages"].items()]


def _kernel_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The kernel rows for the terminal: the share of the roof as a percentage, as the stage
    table shows it (the JSON keeps the fraction)."""
    return [{**r, "roof_share": pct(r.get("roof_share"))} for r in rows]


def render(result: dict[str, Any]) -> str:
    """The whole result as text."""
    meta = result["meta"]
    out = [(f"mergecore bench  {meta['device_name']} ({meta['device']})  commit {meta['commit']}"
           f"  torch {meta['torch']}  {meta['date']}")]
    load = max(meta.get("loadavg_start", 0.0), meta.get("loadavg_end", 0.0))
    if load > (os.cpu_count() or 1):
        out.append(f"warning: load average up to {load:.1f} on {os.cpu_count()} CPUs during the "
                   "run: other work competed for the machine, its numbers are low")
    if result.get("roofs"):
        out += ["", "Roofs (measured in this run, in " + meta["dir"] + ")",
                format_table(_roof_rows(result["roofs"]), ["roof", "GB/s", "page cache before"])]
    if result.get("kernels"):
        out += ["", f"Kernels ({meta['shape']} tensor shapes, {meta['dtype']}; GB/s = inputs read"
                " + output written; roof = " + result["kernel_roof"] + ")",
                format_table(_kernel_rows(result["kernels"]),
                             ["tensor", "op", "impl", "seconds", "gbps", "roof_share",
                              "speedup_vs_torch_eager", "speedup_vs_mergekit"],
                             {"gbps": "GB/s", "roof_share": "of roof",
                              "speedup_vs_torch_eager": "x eager",
                              "speedup_vs_mergekit": "x mergekit"})]
    for run in result.get("e2e", []):
        out += ["", f"End to end: {run['method']} of {run['models']} {meta['shape']}-shaped "
                f"models, {run['layers']} layers, {run['input_bytes'] / 1e9:.2f} GB in, "
                f"{run['output_bytes'] / 1e9:.2f} GB out"
                + (f" (family generated in {run['generate_seconds']:.0f} s)"
                   if run.get("generate_seconds") else ""),
                format_table(_stage_rows(run),
                             ["stage", "seconds", "GB", "GB/s", "roof", "roof GB/s", "of roof"]),
                (f"wall {run['wall_seconds']:.2f} s (stage sum {run['stage_seconds_sum']:.2f} s, "
                f"{run['overlapped_seconds']:.2f} s overlapped = {pct(run['overlap_share'])}), "
                f"bound by {run['bound_stage']}, input {run['input_gbps']:.2f} GB/s, "
                f"inputs in page cache before: {pct(run.get('inputs_cached_share'))}")]
        if run.get("budget_note"):
            out.append("note: " + run["budget_note"])
        vs = run.get("vs_mergekit")
        if vs:
            out.append(f"whole command: mergecore {vs['mergecore_seconds']:.2f} s "
                       f"(peak RSS {vs['mergecore_peak_rss_bytes'] / 1e9:.2f} GB), mergekit-yaml "
                       f"{vs['mergekit_seconds']:.2f} s (peak RSS "
                       f"{vs['mergekit_peak_rss_bytes'] / 1e9:.2f} GB): "
                       f"mergecore is {vs['speedup_vs_mergekit']:.2f}x faster")
    proj = result.get("projection")
    if proj:
        chk = proj.get("check")
        if chk:
            err = chk["growth_relative_error"]
            out += ["", (f"Projection check: {chk['small_layers']} -> {chk['large_layers']} layers:"
                    f" measured wall {chk['measured_wall_seconds']:.2f} s, projected "
                    f"{chk['projected_wall_seconds']:.2f} s ({pct(chk['wall_relative_error'])});"
                    f" growth measured {chk['measured_growth_seconds']:.2f} s, projected "
                    f"{chk['projected_growth_seconds']:.2f} s (error "
                    f"{pct(err) if err is not None else 'n/a'})")]
        full = proj["full"]
        rows = [{"stage": n, "GB": st["bytes"] / 1e9, "GB/s": st["gbps"], "seconds": st["seconds"]}
                for n, st in full["stages"].items()]
        out += ["", (f"Projected full merge: {full['target_layers']} layers, "
                f"{full['input_bytes'] / 1e9:.0f} GB in (from the {full['from_layers']}-layer run)"),
                format_table(rows, ["stage", "GB", "GB/s", "seconds"]),
                (f"wall {full['wall_seconds']:.0f} s ({full['wall_seconds'] / 60:.1f} min) = "
                 f"{full['bound_stage']} (the bound) + {full['fill_drain_seconds']:.0f} s fill/drain"
                 f" + {full['not_overlapped_seconds']:.0f} s not overlapped; input "
                 f"{full['input_gbps']:.2f} GB/s")]
    return "\n".join(out)


def write_json(result: dict[str, Any], path: Path) -> Path:
    """Write ``result`` as indented JSON to ``path`` (parents created); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


class NoChart(Exception):
    """No chart was drawn; the message says why (a phrase for the terminal)."""


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend; :class:`NoChart` when it cannot be imported."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise NoChart(f"matplotlib cannot be imported ({exc}): pip install matplotlib to "
                      "draw one") from exc
    except Exception as exc:
        raise NoChart(f"matplotlib cannot start ({type(exc).__name__}: {exc})") from exc
    return plt


def draw_chart(result: dict[str, Any], path: Path) -> Path:
    """Each end-to-end stage's rate next to its roof, as a bar chart PNG at ``path``.

    Raises :class:`NoChart` saying why when there is nothing to draw (no end-to-end run),
    matplotlib cannot be imported, or drawing or saving the PNG fails."""
    runs = result.get("e2e") or []
    if not runs:
        raise NoChart("nothing measured end to end to draw; the chart shows the merge's stages")
    plt = _pyplot()
    try:
        return _draw(plt, result, runs[-1], path)
    except (OSError, ValueError, RuntimeError) as exc:
        raise NoChart(f"drawing {path} failed: {exc}") from exc


def _draw(plt: Any, result: dict[str, Any], run: dict[str, Any], path: Path) -> Path:
    """Draw ``run``'s stages with pyplot ``plt`` and save the PNG."""
    names = list(run["stages"])
    rates = [run["stages"][n]["gbps"] or 0.0 for n in names]
    roofs = [run["stages"][n]["roof_gbps"] or 0.0 for n in names]
    fig, ax = plt.subplots(figsize=(7, 4))
    try:
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], rates, width=0.4, label="measured stage rate")
        ax.bar([x + 0.2 for x in xs], roofs, width=0.4, label="roof", color="lightgray",
               edgecolor="gray")
        for x, rate, roof in zip(xs, rates, roofs):
            if roof:
                ax.text(x - 0.2, rate, pct(rate / roof), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs), [f"{n}\n({run['stages'][n]['roof']})" for n in names],
                      fontsize=8)
        ax.set_ylabel("GB/s")
        meta = result["meta"]
        ax.set_title(f"{run['method']}, {meta['shape']} x{run['layers']} layers, "
                     f"{meta['device_name'][:40]}\ninput {run['input_gbps']:.2f} GB/s, "
                     f"bound by {run['bound_stage']}", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path
