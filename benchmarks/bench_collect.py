"""Teacher ODE-pair collection: pairs/s of our collector against diffusers' pipeline.

One timed call = one batch of B pairs sampled at S steps with classifier-free guidance, from the
pairs' noise to the final latents on the host:
  provider "ref":           diffusers StableDiffusionPipeline(..., output_type="latent"), the
                            baseline (named "ref" so that the runner's "x ref" column is the
                            speed-up over diffusers)
  provider "ours":          d2g_fast Teacher (the collector's path: per-pair noise, prompt
                            encoding, one batched CFG UNet call per step, latents to the host),
                            channels_last + fused QKV on GPUs
  provider "ours-graphs":   the same with the UNet forward replayed as a CUDA graph (GPU)
  provider "ours-compiled": the same with torch.compile of the UNet (GPU, opt-in: set
                            D2G_BENCH_COMPILE=1; compiling the full UNet takes about a minute)
Same device, dtype, batch, steps and guidance for every provider. GPU: the SD1.5 UNet and CLIP
text encoder architectures with random weights (no download), fp16, 64x64 latents, 50 steps.
Quick/CPU: the tiny SD model. The providers are built by d2g_fast.bench.collect_speed (shared with
`d2g bench gpu-days`). pairs/s = B / median time; device-days per million pairs =
1e6 / (pairs/s) / 86400. Run this file directly for that table:

    python benchmarks/bench_collect.py --device cuda [--batch 4 8] [--compile]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import Case, SkipCase  # noqa: E402

from d2g_fast.bench.collect_speed import GUIDANCE  # noqa: E402

# The runner's "x ref" column is the speed-up over the provider named "ref": diffusers here.
_PROVIDER_OF = {"ref": "diffusers", "ours": "ours", "ours-graphs": "ours-graphs",
                "ours-compiled": "ours-compiled"}


def _make(provider: str, device: str, quick: bool, batch: int, steps: int, dtype):
    def make():
        from d2g_fast.bench import archs
        from d2g_fast.bench.collect_speed import make_collect_fn, unavailable_reason

        if provider == "ours-compiled" and os.environ.get("D2G_BENCH_COMPILE") != "1":
            raise SkipCase("opt-in on GPUs: D2G_BENCH_COMPILE=1")
        reason = unavailable_reason(_PROVIDER_OF[provider], device)
        if reason:
            raise SkipCase(reason)
        comps = archs.components("tiny" if quick else "sd15", device=device, dtype=dtype)
        fn = make_collect_fn(_PROVIDER_OF[provider], comps, device=device, batch=batch,
                             steps=steps)
        return {"fwd": fn}
    return make


def cases(device: str, quick: bool) -> list[Case]:
    gpu = device.startswith("cuda")
    dtype = torch.float16 if gpu else torch.float32
    if gpu and not quick:
        batch, steps, model = 4, 50, "SD1.5 UNet 4x64x64 fp16"
    else:
        batch, steps, model = 4, 50 if gpu else 20, "tiny-SD 4x8x8 fp32" if not gpu \
            else "tiny-SD 4x8x8 fp16"
    config = f"{model} B={batch} {steps}steps cfg{GUIDANCE:g}"
    note = (f"ref = diffusers pipeline; pairs/s = {batch}e3/median_ms; device-days per 1M "
            f"pairs = median_ms/{batch}/86.4")
    return [Case(op="collect_pairs", config=config, provider=p, note=note, modes=("fwd",),
                 make=_make(p, device, quick, batch, steps, dtype))
            for p in ("ref", "ours", "ours-graphs", "ours-compiled")]


def _rows(device: str, quick: bool, batches: list[int], steps: int, dtype):
    """One table row per batch size and available provider, yielded as soon as it is timed."""
    from benchmarks.harness import time_callable

    for batch in batches:
        base = None
        for provider in ("ref", "ours", "ours-graphs", "ours-compiled"):
            try:
                fn = _make(provider, device, quick, batch, steps, dtype)()["fwd"]
            except SkipCase:
                continue
            ms = time_callable(fn, device, min_time_s=1.0, min_reps=3, warmup=1)["median_ms"]
            rate = batch / (ms * 1e-3)
            base = base or rate
            yield [provider, str(batch), f"{ms / 1e3:.3f}", f"{rate:.3g}",
                   f"{1e6 / rate / 86400:.3g}", f"{rate / base:.2f}x"]
            del fn
            if device.startswith("cuda"):
                torch.cuda.empty_cache()


def main(argv=None) -> int:
    from benchmarks.harness import markdown_table_lines

    p = argparse.ArgumentParser(description="pairs/s and device-days per million pairs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny model")
    p.add_argument("--batch", type=int, nargs="*", default=[4])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--compile", action="store_true", help="also time ours-compiled")
    args = p.parse_args(argv)
    if args.compile:
        os.environ["D2G_BENCH_COMPILE"] = "1"
    gpu = args.device.startswith("cuda")
    dtype = torch.float16 if gpu else torch.float32
    quick = args.quick or not gpu
    name = torch.cuda.get_device_name() if gpu else "cpu"
    print(f"# {name} | torch {torch.__version__} | {'tiny-SD' if quick else 'SD1.5 UNet'} "
          f"{str(dtype).replace('torch.', '')} | {args.steps} steps, guidance {GUIDANCE:g}")
    header = ["provider", "batch", "s/batch", "pairs/s", "device-days / 1M pairs",
              "vs diffusers"]
    for line in markdown_table_lines(
            header, _rows(args.device, quick, args.batch, args.steps, dtype), align="lrrrrr"):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
