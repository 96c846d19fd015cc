#!/usr/bin/env python
"""Benchmark runner: every benchmarks/bench_*.py, every provider, forward / backward / both.

    python benchmarks/run.py --device cpu --quick            # what `make bench` runs
    python benchmarks/run.py --device cuda --out DIR         # what gpu_check.sh runs
    python benchmarks/run.py --device cpu --only lpips_distance

Writes ``<out>/<tag>.csv`` and ``<out>/<tag>.md`` whose rows carry the device name, torch version,
date and git revision, and prints the markdown table.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import importlib
import os
import platform
import subprocess
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

from benchmarks.harness import SkipCase, copy_bandwidth_gbs, matmul_tflops, time_callable  # noqa: E402

COLUMNS = ["op", "config", "provider", "mode", "median_ms", "min_ms", "p90_ms", "reps", "peak_mem_mb",
           "gb_s", "tflop_s", "vs_ref", "of_floor", "note", "device", "torch", "date", "git"]


def git_revision() -> str:
    if os.environ.get("D2G_GIT_REV"):  # a copied tree without .git (e.g. a GPU machine)
        return os.environ["D2G_GIT_REV"]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=HERE, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=HERE, timeout=10).stdout.strip()
        return (rev + ("+dirty" if dirty else "")) or "unknown"
    except Exception:
        return "unknown"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def bench_modules(only: list[str] | None):
    names = sorted(f[:-3] for f in os.listdir(HERE) if f.startswith("bench_") and f.endswith(".py"))
    for name in names:
        if only and not any(o in name for o in only):
            continue
        yield name, importlib.import_module(f"benchmarks.{name}")


def fmt(v, digits=3):
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def write_outputs(rows, args, argv, tags, floor_gbs, peak_tflops, final=False):
    """(Re)write the CSV and markdown; called after every case so a run stopped by a time box
    keeps what it measured."""
    # Speed-up against the reference provider of the same op/config/mode.
    ref_times = {(r["op"], r["config"], r["mode"]): r["median_ms"] for r in rows
                 if r.get("provider") == "ref" and r.get("median_ms")}
    for r in rows:
        t = ref_times.get((r["op"], r["config"], r["mode"]))
        if t and r.get("median_ms"):
            r["vs_ref"] = t / r["median_ms"]

    os.makedirs(args.out, exist_ok=True)
    stamp = f"{'gpu' if args.device.startswith('cuda') else 'cpu'}-{tags['date']}-{tags['git']}"
    if args.only:
        stamp += "-" + "-".join(o.replace("bench_", "") for o in args.only)
    csv_path = os.path.join(args.out, f"bench-{stamp}.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in COLUMNS})
    md = [f"Device: {tags['device']}; torch {tags['torch']}; {tags['date']}; git {tags['git']}; "
          f"measured copy bandwidth {floor_gbs:.0f} GB/s, bf16 matmul {peak_tflops:.1f} TFLOP/s; "
          f"command: `python benchmarks/run.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
          "",
          "| op | config | provider | mode | median ms | peak MB | GB/s | TFLOP/s | x ref | of floor | note |",
          "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        md.append("| " + " | ".join(fmt(r.get(k)) for k in ("op", "config", "provider", "mode", "median_ms",
                                                            "peak_mem_mb", "gb_s", "tflop_s", "vs_ref",
                                                            "of_floor", "note")) + " |")
    md_path = os.path.join(args.out, f"bench-{stamp}.md")
    with open(md_path, "w") as f:
        f.write("\n".join(md) + "\n")
    if final:
        print("\n".join(md))
        print(f"\nwrote {csv_path} and {md_path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small shapes (CPU-friendly)")
    p.add_argument("--only", nargs="*", help="substrings of benchmark file names to run")
    p.add_argument("--out", default=os.path.join(HERE, "out"))
    p.add_argument("--min-time", type=float, default=0.3, help="seconds of timed runs per mode")
    args = p.parse_args(argv)

    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but no GPU is visible")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    tags = {"device": device_name(device), "torch": torch.__version__,
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"), "git": git_revision()}
    floor_gbs = copy_bandwidth_gbs(device)
    peak_tflops = matmul_tflops(device)
    print(f"# {tags['device']} | torch {tags['torch']} | {tags['date']} | git {tags['git']}")
    print(f"# measured copy bandwidth {floor_gbs:.0f} GB/s, bf16 matmul {peak_tflops:.1f} TFLOP/s")

    rows = []
    for name, module in bench_modules(args.only):
        try:
            cases = module.cases(device, args.quick)
        except Exception as exc:
            print(f"[{name}] cases() failed: {exc}", file=sys.stderr)
            traceback.print_exc()
            continue
        for case in cases:
            try:
                fns = case.make()
            except SkipCase as exc:
                rows.append(dict(op=case.op, config=case.config, provider=case.provider, mode="-",
                                 note=f"skipped: {exc}", **tags))
                continue
            except Exception as exc:
                traceback.print_exc()
                rows.append(dict(op=case.op, config=case.config, provider=case.provider, mode="-",
                                 note=f"failed: {type(exc).__name__}: {exc}"[:200], **tags))
                continue
            for mode, fn in fns.items():
                try:
                    r = time_callable(fn, device, min_time_s=args.min_time)
                except Exception as exc:
                    traceback.print_exc()
                    rows.append(dict(op=case.op, config=case.config, provider=case.provider, mode=mode,
                                     note=f"failed: {type(exc).__name__}: {exc}"[:200], **tags))
                    continue
                nbytes = {"fwd": case.bytes, "bwd": case.bwd_bytes}.get(mode)
                if mode == "fwd+bwd" and case.bytes and case.bwd_bytes:
                    nbytes = case.bytes + case.bwd_bytes
                nflops = {"fwd": case.flops, "bwd": case.bwd_flops}.get(mode)
                if mode == "fwd+bwd" and case.flops and case.bwd_flops:
                    nflops = case.flops + case.bwd_flops
                sec = r["median_ms"] * 1e-3
                row = dict(op=case.op, config=case.config, provider=case.provider, mode=mode, **r,
                           gb_s=nbytes / sec / 1e9 if nbytes else None,
                           tflop_s=nflops / sec / 1e12 if nflops else None, note=case.note, **tags)
                if row["gb_s"]:
                    row["of_floor"] = row["gb_s"] / floor_gbs
                elif row["tflop_s"]:
                    row["of_floor"] = row["tflop_s"] / peak_tflops
                rows.append(row)
                print(f"  {case.op:<22} {case.config:<28} {case.provider:<14} {mode:<8} "
                      f"{r['median_ms']:10.3f} ms", flush=True)
            del fns
            write_outputs(rows, args, argv, tags, floor_gbs, peak_tflops)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()

    write_outputs(rows, args, argv, tags, floor_gbs, peak_tflops, final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
