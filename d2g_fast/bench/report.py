"""Writing the gpu-days report: DIR/gpu_days.csv, DIR/gpu_days.md and DIR/gpu_days.png."""
from __future__ import annotations

import csv
import math
import os

CSV_COLUMNS = ("name", "section", "quantity", "value", "unit", "source", "detail")
SECTION_TITLES = (
    ("recipe", "Device-days of the recipe on this device"),
    ("savings", "What each optimisation saves (derived from the measured rows)"),
    ("collection", "Measured: ODE-pair collection"),
    ("training", "Measured: the trainer's full step"),
    ("loss", "Measured: the regression loss alone"),
    ("memory", "Model-state memory per GPU, replicated and FSDP2 (parameters counted on "
               "meta-device networks; activations not included)"),
    ("published", "Published costs (cited, on the authors' hardware; not measured here)"),
)
SOURCE_COLOURS = {"measured": "tab:blue", "derived": "tab:green", "cited": "tab:gray"}


def fmt(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def write_csv(rows, path: str) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for r in rows:
            writer.writerow([r.name, r.section, r.quantity,
                             "" if r.value is None else repr(float(r.value)), r.unit, r.source,
                             r.detail])
    return path


def markdown(rows, meta: dict) -> str:
    """The report as markdown: a header naming command, device and revision, one table per
    section, then what was not measured here."""
    partial = " so far (PARTIAL: stages still running or cut short)" if meta.get("partial") \
        else ""
    lines = [f"# GPU-day accounting: {meta['arch']} on {meta['device']}", "",
             f"Command: `{meta['command']}`; torch {meta['torch']}; git {meta['git']}; "
             f"{meta['date']}; this run took {meta['wall_s']:.0f} s{partial}.",
             f"Recipe: {meta['recipe']}.",
             "Every row is measured (in this run, on this device), derived (from the named rows) "
             "or cited (with its source and hardware).", ""]
    for section, title in SECTION_TITLES:
        part = [r for r in rows if r.section == section]
        if not part:
            continue
        lines += [f"## {title}", "", "| quantity | value | unit | source | how |",
                  "|---|---:|---|---|---|"]
        lines += [f"| {r.quantity} | {fmt(r.value)} | {r.unit} | {r.source} | "
                  f"{r.detail.replace('|', '/')} |" for r in part]
        lines.append("")
    if meta.get("omitted"):
        lines += ["## Not measured on this device (omitted, not estimated)", ""]
        lines += [f"- {what}" for what in meta["omitted"]]
        lines.append("")
    return "\n".join(lines)


def write_png(rows, meta: dict, path: str) -> str:
    """Horizontal bars: the recipe's device-days here (derived) beside the published costs
    (cited; their units name their hardware)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [r for r in rows if r.section == "recipe" and r.value is not None]
    bars += [r for r in rows if r.section == "published" and r.unit.endswith("-days")]
    fig, ax = plt.subplots(figsize=(10, 0.45 * max(len(bars), 4) + 1.5))
    labels = [f"{r.quantity} [{r.unit}]" for r in bars]
    values = [max(r.value, 1e-12) for r in bars]
    ax.barh(range(len(bars)), values, color=[SOURCE_COLOURS[r.source] for r in bars])
    ax.set_yticks(range(len(bars)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("device-days (log scale); each bar's unit names its hardware")
    for i, v in enumerate(values):
        ax.text(v, i, f" {fmt(v)}", va="center", fontsize=7)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in SOURCE_COLOURS.values()]
    ax.legend(handles, list(SOURCE_COLOURS), loc="lower right", fontsize=7)
    ax.set_title(f"{meta['arch']}: {meta['recipe']}\nmeasured on {meta['device']} "
                 f"(git {meta['git']}) vs published", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_text_files(rows, meta: dict, out: str) -> list[str]:
    """DIR/gpu_days.csv and DIR/gpu_days.md; returns their paths."""
    paths = [write_csv(rows, os.path.join(out, "gpu_days.csv")), os.path.join(out, "gpu_days.md")]
    with open(paths[1], "w", encoding="utf-8") as f:
        f.write(markdown(rows, meta) + "\n")
    return paths


def write_all(rows, meta: dict, out: str) -> list[str]:
    """Write the three files into ``out`` (the PNG only where matplotlib imports: the markdown
    then says so); returns their paths."""
    png = []
    try:
        png.append(write_png(rows, meta, os.path.join(out, "gpu_days.png")))
    except ImportError as exc:
        meta.setdefault("omitted", []).append(f"gpu_days.png not drawn: matplotlib is not "
                                              f"importable ({exc})")
    return write_text_files(rows, meta, out) + png
