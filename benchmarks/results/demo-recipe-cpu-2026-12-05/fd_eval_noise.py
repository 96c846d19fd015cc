"""How much of a student's FD / accuracy is the evaluation's own sampling noise: the same
student judged on the demo's 288 held-out prompts with K other held-out noise seeds (and, for
FD, K other real-image sets), one thread.

    python fd_eval_noise.py STUDENT_DIR [K=5] [N=288]
"""
import json
import statistics
import sys

import torch

torch.set_num_threads(1)
from d2g_fast import toy  # noqa: E402
import importlib  # noqa: E402

# the module (d2g_fast.toy re-exports its evaluate() function under the same name)
ev = importlib.import_module("d2g_fast.toy.evaluate")

ev.quiet_diffusers()
folder = sys.argv[1]
k = int(sys.argv[2]) if len(sys.argv) > 2 else 5
n = int(sys.argv[3]) if len(sys.argv) > 3 else 288
world = toy.shipped_dir()
clf = ev.load_classifier(world / "classifier.safetensors")
pipe = ev.load_pipeline(folder)
vae = ev.load_pipeline(world / "teacher").vae
rows = []
for i in range(k):
    prompts, noise = ev.heldout(n, ev.HELDOUT_SEED + 1000 * i)
    real = ev.real_features(clf, max(n, 512), ev.REAL_SEED + 1000 * i)
    images = ev.decode(vae, ev.pipeline_latents(pipe, prompts, noise, 1, 1.0))
    m = ev.image_metrics(clf, images, prompts, real)
    rows.append({"eval_seed": i, "fd": m["fd"], "accuracy": m["accuracy"]})
    print(json.dumps(rows[-1]), flush=True)
fds, accs = [r["fd"] for r in rows], [r["accuracy"] for r in rows]
print(json.dumps({"student": folder, "n": n, "k": k, "fd_mean": statistics.mean(fds),
                  "fd_sd": statistics.stdev(fds), "acc_mean": statistics.mean(accs),
                  "acc_sd": statistics.stdev(accs)}))
