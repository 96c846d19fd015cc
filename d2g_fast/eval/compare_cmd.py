"""``d2g compare``: reports of ``d2g eval`` side by side (teacher at N steps, student at one step,
baselines: FID, CLIP score, second-space FD, precision, recall, diversity), refused when they were
measured under different protocols (including another precision / recall k, reference features or
diversity sampling)."""
from __future__ import annotations

import argparse

HELP = "put d2g eval reports side by side (refuses mismatched protocols)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("reports", nargs="+", metavar="REPORT",
                   help="report.json files or d2g eval --out folders")
    p.add_argument("--out", default=None, help="also write the markdown table to this file")


def run(args) -> int:
    from d2g_fast.data.store import atomic_write_bytes
    from d2g_fast.eval.report import compare_markdown, load_report

    reports = [load_report(path) for path in args.reports]
    text = compare_markdown(reports, list(args.reports))
    print(text, end="")
    if args.out:
        atomic_write_bytes(args.out, text.encode())
    return 0
