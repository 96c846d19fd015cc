"""The shipped toy teacher's DDIM at 25 and 10 steps (the demo's collection before / after issue
23 item 3) on the demo's held-out prompts and noise: FD, accuracy, per-attribute accuracy, and
E-LatentLPIPS of the 10-step latents to the 25-step ones (how far the new pairs' targets move).

    python teacher_steps.py [N=288] [TOY_DIR]
"""
import importlib
import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
from d2g_fast import toy  # noqa: E402

ev = importlib.import_module("d2g_fast.toy.evaluate")
ev.quiet_diffusers()
n = int(sys.argv[1]) if len(sys.argv) > 1 else 288
world = Path(sys.argv[2]) if len(sys.argv) > 2 else toy.shipped_dir()
pipe = ev.use_ddim(ev.load_pipeline(world / "teacher"))
clf = ev.load_classifier(world / "classifier.safetensors")
lpips = ev.load_elatentlpips(world / "elatentlpips.safetensors")
prompts, noise = ev.heldout(n)
real = ev.real_features(clf, max(n, 512))
lat = {s: ev.pipeline_latents(pipe, prompts, noise, s, 4.0) for s in (25, 10)}
for s, x in lat.items():
    m = ev.image_metrics(clf, ev.decode(pipe.vae, x), prompts, real)
    print(json.dumps({"world": str(world), "steps": s, "fd": m["fd"], "accuracy": m["accuracy"],
                      "attribute_accuracy": m["attribute_accuracy"]}), flush=True)
print(json.dumps({"e_latentlpips_10_to_25": ev.mean_latent_distance(lpips, lat[10], lat[25])}))
