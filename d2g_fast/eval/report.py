"""Evaluation reports: one JSON (the record) and one markdown (for people) per model, and the
side-by-side comparison of several reports measured under the same protocol."""
from __future__ import annotations

import json
import os

from d2g_fast.data.store import atomic_write_bytes, atomic_write_json

FORMAT = "d2g-eval-report"
VERSION = 1
REPORT_JSON = "report.json"
REPORT_MD = "report.md"

_METRICS = (("fid", "FID"), ("clip_score", "CLIP score"), ("fd_extra", "FD (2nd space)"),
            ("precision", "precision"), ("recall", "recall"), ("diversity", "diversity"))
# Rows of a report's metrics table after _METRICS (counts and spreads behind the numbers).
_DETAILS = (("pr_num_real", "precision / recall: reference images"),
            ("pr_num_fake", "precision / recall: generated images"),
            ("diversity_std", "diversity: std over captions"),
            ("diversity_pairs", "diversity: image pairs compared"))
_EXPLAINED = [
    "- **precision / recall**: Kynkäänniemi et al. 2019's k-NN manifold estimate in the Inception "
    "space (k = protocol pr_k): the share of generated images inside the reference images' "
    "manifold (fidelity), and of reference images inside the generated images' manifold "
    "(coverage); \"-\": the reference statistics hold no per-image features.",
    "- **diversity**: mean Inception-feature distance between images of the same caption under "
    "different noise (protocol diversity_prompts x diversity_seeds extra images); 0 is a "
    "generator that ignores its noise.",
]


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, str) and value != value.strip():
        return repr(value)  # keeps a prefix's trailing space visible
    return str(value)


def _table(rows: list[tuple], header: tuple) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v).replace("|", "\\|") for v in row) + " |" for row in rows]
    return lines


def markdown(report: dict) -> str:
    """A report as markdown: metrics, then every protocol choice, the model and the run."""
    lines = [f"# Evaluation: {report['label']}", "", "## Metrics", ""]
    metrics = report["metrics"]
    lines += _table([(title, metrics.get(key)) for key, title in _METRICS + _DETAILS]
                    + [("images", metrics.get("num_images"))], ("metric", "value"))
    lines += [""] + _EXPLAINED
    for section, title in (("protocol", "Protocol (every choice)"), ("model", "Model"),
                           ("reference", "Reference"), ("run", "Run"),
                           ("environment", "Environment")):
        lines += ["", f"## {title}", ""]
        lines += _table(sorted(report[section].items()), ("field", "value"))
    return "\n".join(lines) + "\n"


def write_report(out: str, report: dict) -> tuple[str, str]:
    """Write report.json and report.md into ``out``; returns their paths."""
    json_path, md_path = os.path.join(out, REPORT_JSON), os.path.join(out, REPORT_MD)
    atomic_write_json(json_path, report)
    atomic_write_bytes(md_path, markdown(report).encode())
    return json_path, md_path


def load_report(path: str) -> dict:
    """A report from its JSON file or its evaluation folder. Errors name REPORT."""
    if os.path.isdir(path):
        path = os.path.join(path, REPORT_JSON)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"REPORT: no such report {path!r}")
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"REPORT: cannot read {path!r}: {exc}") from exc
    if not isinstance(report, dict) or report.get("format") != FORMAT:
        raise ValueError(f"REPORT: {path!r} is not a d2g eval report (format {FORMAT!r})")
    if report.get("version") != VERSION:
        raise ValueError(f"REPORT: {path!r} has report version {report.get('version')}, "
                         f"this d2g reads version {VERSION}")
    return report


def protocol_mismatches(a: dict, b: dict) -> list[str]:
    """Protocol fields where reports ``a`` and ``b`` differ ("field: a vs b")."""
    pa, pb = a["protocol"], b["protocol"]
    return [f"{k}: {pa.get(k)!r} vs {pb.get(k)!r}" for k in sorted(set(pa) | set(pb))
            if pa.get(k) != pb.get(k)]


def compare_markdown(reports: list[dict], paths: list[str]) -> str:
    """Side by side (one row per report), after checking that all share one protocol.

    Raises:
        ValueError naming the first report whose protocol differs from the first one's.
    """
    for report, path in zip(reports[1:], paths[1:]):
        diffs = protocol_mismatches(reports[0], report)
        if diffs:
            raise ValueError(f"REPORT: {path!r} was measured under another protocol than "
                             f"{paths[0]!r}; numbers are not comparable ("
                             + "; ".join(diffs) + ")")
    rows = [(r["label"], r["model"].get("steps"), r["model"].get("guidance"),
             *(r["metrics"].get(key) for key, _ in _METRICS), r["metrics"].get("num_images"))
            for r in reports]
    protocol = reports[0]["protocol"]
    lines = [f"# Comparison under protocol {protocol['name']}", ""]
    lines += _table(rows, ("model", "steps", "guidance", *(t for _, t in _METRICS), "images"))
    lines += ["", "## Shared protocol", ""]
    lines += _table(sorted(protocol.items()), ("field", "value"))
    return "\n".join(lines) + "\n"
