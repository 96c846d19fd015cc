"""``d2g verify``: checksums of a pair store, and optionally re-running the teacher on K pairs."""
from __future__ import annotations

import argparse
import os
import sys

HELP = "check a pair store: shard checksums, and re-run the teacher on K random pairs"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", help="store folder written by d2g collect; also a d2g distill run "
                   "folder (every checkpoint), a d2g export folder or a d2g lpips checkpoint")
    p.add_argument("--recompute", type=int, default=0, metavar="K",
                   help="re-run the teacher on K random pairs and compare")
    p.add_argument("--teacher", default=None,
                   help="teacher folder for --recompute (None: the one in the manifest)")
    p.add_argument("--device", default="auto", help="device for --recompute")
    p.add_argument("--seed", type=int, default=0, help="which K pairs to recompute")
    p.add_argument("--atol", type=float, default=None,
                   help="latent tolerance, relative to max(1, max |latent|) (None: 1e-3 for "
                        "float32 stores, 5e-2 for half precision)")


def run(args: argparse.Namespace) -> int:
    import random

    from d2g_fast.data.store import read_manifest, verify_store
    from d2g_fast.teacher.collect_cmd import quiet_model_loading, resolve_device_dtype

    quiet_model_loading()
    from d2g_fast.runtime.verify import verify_path

    if not os.path.isfile(os.path.join(args.root, "manifest.json")):
        other = verify_path(args.root)  # a run folder, an exported student, an lpips checkpoint
        if other is not None:
            if other:
                print(f"d2g verify: {len(other)} problem(s) in {args.root}", file=sys.stderr)
                return 1
            print(f"d2g verify: {args.root} is intact")
            return 0
    problems = verify_store(args.root)
    for problem in problems:
        print(f"FAIL {problem}")
    if args.recompute < 0:
        raise ValueError(f"recompute (--recompute): must be >= 0, got {args.recompute}")
    if args.recompute and not problems:
        from d2g_fast.teacher.adapter import Teacher
        from d2g_fast.teacher.collect import recompute_pairs

        manifest = read_manifest(args.root)
        teacher_path = args.teacher or manifest["teacher"].get("source")
        if not teacher_path:
            raise ValueError("teacher (--teacher): the manifest names no teacher folder; pass one")
        device, _ = resolve_device_dtype(args.device, "auto")
        teacher = Teacher.from_pretrained(teacher_path, dtype=manifest["config"]["dtype"],
                                          device=device,
                                          resolution=tuple(manifest["config"]["resolution"]))
        rng = random.Random(args.seed)
        k = min(args.recompute, manifest["pairs_done"])
        indices = sorted(rng.sample(range(manifest["pairs_done"]), k))
        for r in recompute_pairs(teacher, args.root, indices, atol=args.atol):
            status = "ok  " if r["ok"] else "FAIL"
            print(f"{status} pair {r['index']}: noise {'ok' if r['noise_ok'] else 'DIFFERS'}, "
                  f"prompt {'ok' if r['prompt_ok'] else 'DIFFERS'}, guidance "
                  f"{'ok' if r['guidance_ok'] else 'DIFFERS'}, latent max |diff| "
                  f"{r['max_abs_err']:.3g} (tolerance {r['tolerance']:.3g})")
            if not r["ok"]:
                problems.append(f"pair {r['index']}")
    if problems:
        print(f"d2g verify: {len(problems)} problem(s) in {args.root}", file=sys.stderr)
        return 1
    print(f"d2g verify: {args.root} is intact")
    return 0
