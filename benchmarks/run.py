#!/usr/bin/env python
"""Benchmark runner: every benchmarks/bench_*.py, every provider, forward / backward / both.

    python benchmarks/run.py --device cpu --quick            # what `make bench` runs
    python benchmarks/run.py --device cuda --out DIR         # what gpu_check.sh runs
    python benchmarks/run.py --device cpu --only lpips_distance
    python benchmarks/run.py --device cpu --quick --rounds 3   # providers interleaved, 3 rounds
    python benchmarks/run.py --device cpu --only multiscale_heads --providers cpu ref-compiled

With --rounds R every case is made and timed once per round, all cases in turn, so that a
machine shared with other work slows every provider alike; a row's median is the median of
its R round medians and "spread" the lowest and highest round median. "first ms" is the first
call of the first round (the compile time of the ref-compiled provider); "peak MB" is one
extra call measured by benchmarks.harness.peak_memory_mb (first round).

Writes ``<out>/<tag>.csv`` and ``<out>/<tag>.md`` whose rows carry the device name, torch version,
date, git revision and the CPU's flags (AMX, AVX-512 BF16, ...), and prints the markdown table.

The cases are those of pytest-benchmark's run (``pytest benchmarks/ --benchmark-only``, which
gives JSON, --benchmark-compare and regression gates): both take them from the bench_*.py files
through benchmarks.harness. This runner adds what pytest-benchmark does not do: rounds
interleaved across providers, ratios against the references and the measured floor, peak
memory, the markdown tables.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import statistics
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

from benchmarks.harness import (COMPILE_KWARGS, COMPILED, SkipCase, bench_names,  # noqa: E402
                                copy_bandwidth_gbs, disable_tf32, load_cases, machine_tags,
                                markdown_table, matmul_tflops, peak_memory_mb, time_callable)

COLUMNS = ["op", "config", "provider", "mode", "median_ms", "min_ms", "p90_ms", "reps", "rounds",
           "round_min_ms", "round_max_ms", "round_ms", "first_ms", "peak_mem_mb", "gb_s", "tflop_s", "vs_ref",
           "vs_compiled", "of_floor", "note", "device", "torch", "date", "git", "threads", "cpu_flags"]


def fmt(v, digits=3):
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def write_outputs(rows, args, argv, tags, floor_gbs, peak_tflops, final=False):
    """(Re)write the CSV and markdown; called after every case so a run stopped by a time box
    keeps what it measured."""
    for r in rows:  # fraction of the measured copy bandwidth, or else of the matmul peak
        if r.get("gb_s"):
            r["of_floor"] = r["gb_s"] / floor_gbs
        elif r.get("tflop_s"):
            r["of_floor"] = r["tflop_s"] / peak_tflops
    # Speed-up against the eager and the compiled reference of the same op/config/mode.
    for column, provider in (("vs_ref", "ref"), ("vs_compiled", COMPILED)):
        base = {(r["op"], r["config"], r["mode"]): r["median_ms"] for r in rows
                if r.get("provider") == provider and r.get("median_ms")}
        for r in rows:
            t = base.get((r["op"], r["config"], r["mode"]))
            if t and r.get("median_ms"):
                r[column] = t / r["median_ms"]

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
    md = [f"Device: {tags['device']}; CPU flags {tags['cpu_flags']}; torch {tags['torch']}; "
          f"{tags['threads']} threads; {tags['date']}; git {tags['git']}; measured copy bandwidth {floor_gbs:.0f} GB/s, bf16 matmul "
          f"{peak_tflops:.1f} TFLOP/s; {COMPILED} = torch.compile(reference, {COMPILE_KWARGS}); "
          f"command: `python benchmarks/run.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
          "",
          "median ms: median of the round medians; spread: lowest-highest round median; first ms: "
          "first call (includes compiling); peak MB: one call, allocations through torch above the "
          "start (CPU: torch.profiler allocation events; CUDA: max_memory_allocated); "
          "x ref / x compiled: speed-up over the eager / compiled reference.",
          ""]
    cells = []
    for r in rows:
        spread = (f"{fmt(r['round_min_ms'])}-{fmt(r['round_max_ms'])}" if r.get("round_min_ms") is not None
                  else "")
        cells.append([fmt(r.get(k)) for k in ("op", "config", "provider", "mode", "median_ms")] + [spread] +
                     [fmt(r.get(k)) for k in ("first_ms", "peak_mem_mb", "gb_s", "tflop_s", "vs_ref",
                                              "vs_compiled", "of_floor", "note")])
    md += markdown_table(["op", "config", "provider", "mode", "median ms", "spread", "first ms", "peak MB",
                          "GB/s", "TFLOP/s", "x ref", "x compiled", "of floor", "note"], cells,
                         align="llllrlrrrrrrrl")
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
    p.add_argument("--rounds", type=int, default=1,
                   help="time every case this many times, all cases in turn (interleaved)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--providers", nargs="*", help="only these providers (e.g. cpu ref-compiled)")
    p.add_argument("--modes", nargs="*", choices=("fwd", "bwd", "fwd+bwd"), help="only these modes")
    p.add_argument("--min-reps", type=int, default=5, help="timed calls per mode at least")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.min_reps < 1:
        p.error(f"--min-reps must be at least 1, got {args.min_reps}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")

    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but no GPU is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    disable_tf32()
    tags = dict(machine_tags(device), date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"))
    floor_gbs = copy_bandwidth_gbs(device)
    peak_tflops = matmul_tflops(device)
    print(f"# {tags['device']} | torch {tags['torch']} | {tags['threads']} threads | {tags['date']} | "
          f"git {tags['git']} | CPU flags {tags['cpu_flags']}")
    print(f"# measured copy bandwidth {floor_gbs:.0f} GB/s, bf16 matmul {peak_tflops:.1f} TFLOP/s")

    all_cases = []
    for name in bench_names(args.only):
        try:
            all_cases += [c for c in load_cases(name, device, args.quick)
                          if not args.providers or c.provider in args.providers]
        except Exception as exc:
            print(f"[{name}] cases() failed: {exc}", file=sys.stderr)
            traceback.print_exc()

    # rows keyed by (case index, mode), filled in round by round; "-" is a case that did not run.
    results: dict = {}
    for round_ in range(args.rounds):
        for i, case in enumerate(all_cases):
            if (i, "-") in results:  # skipped or failed in an earlier round
                continue
            run_case(i, case, round_, device, args, tags, results)
            rows = finished_rows(all_cases, results)
            write_outputs(rows, args, argv, tags, floor_gbs, peak_tflops)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()

    write_outputs(finished_rows(all_cases, results), args, argv, tags, floor_gbs, peak_tflops, final=True)
    return 0


def run_case(i, case, round_, device, args, tags, results) -> None:
    """Make ``case`` and time each of its modes once; the first round also measures peak memory."""
    base = dict(op=case.op, config=case.config, provider=case.provider, **tags)
    try:
        fns = case.build()
    except SkipCase as exc:
        results[(i, "-")] = dict(base, mode="-", note=f"skipped: {exc}")
        return
    except Exception as exc:
        traceback.print_exc()
        results[(i, "-")] = dict(base, mode="-", note=f"failed: {type(exc).__name__}: {exc}"[:200])
        return
    for mode in case.modes:
        fn = fns[mode]
        if args.modes and mode not in args.modes:
            continue
        key = (i, mode)
        if key in results and "failed" in results[key].get("note", ""):
            continue
        try:
            r = time_callable(fn, device, min_time_s=args.min_time, min_reps=args.min_reps)
            if round_ == 0:
                r["peak_mem_mb"] = peak_memory_mb(fn, device)
        except Exception as exc:
            traceback.print_exc()
            results[key] = dict(base, mode=mode, note=f"failed: {type(exc).__name__}: {exc}"[:200])
            continue
        row = results.setdefault(key, dict(base, mode=mode, note=case.note, round_medians=[]))
        row["round_medians"].append(r.pop("median_ms"))
        if round_ == 0:
            row.update(r)
        else:
            row["min_ms"] = min(row["min_ms"], r["min_ms"])
            row["reps"] += r["reps"]
        print(f"  [{round_ + 1}/{args.rounds}] {case.op:<22} {case.config:<28} {case.provider:<14} {mode:<8} "
              f"{row['round_medians'][-1]:10.3f} ms", flush=True)
    del fns


def finished_rows(all_cases, results) -> list[dict]:
    """The result rows in case order, with the median over rounds and the throughput columns."""
    rows = []
    for (i, mode), row in sorted(results.items(), key=lambda kv: kv[0][0]):
        row = dict(row)
        medians = row.pop("round_medians", None)
        if medians:
            case = all_cases[i]
            row.update(median_ms=statistics.median(medians), rounds=len(medians),
                       round_min_ms=min(medians), round_max_ms=max(medians),
                       round_ms=" ".join(f"{m:.4g}" for m in medians))  # paired across providers
            nbytes = {"fwd": case.bytes, "bwd": case.bwd_bytes}.get(mode)
            if mode == "fwd+bwd" and case.bytes and case.bwd_bytes:
                nbytes = case.bytes + case.bwd_bytes
            nflops = {"fwd": case.flops, "bwd": case.bwd_flops}.get(mode)
            if mode == "fwd+bwd" and case.flops and case.bwd_flops:
                nflops = case.flops + case.bwd_flops
            sec = row["median_ms"] * 1e-3
            row["gb_s"] = nbytes / sec / 1e9 if nbytes else None
            row["tflop_s"] = nflops / sec / 1e12 if nflops else None
        rows.append(row)
    return rows


if __name__ == "__main__":
    sys.exit(main())
