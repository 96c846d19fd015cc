"""Does the toy teacher read the quadrant from the schedule's signal leak (issue 25)?

SD1.5's scaled-linear schedule keeps sqrt(alpha_bar) = 0.085 of the clean latent at t = 961,
the first of 25 DDIM steps, so a training input there still shows where the shape is; at
sampling the first input is pure noise. For each position caption (shape, colour, background
fixed) the UNet's mean x0 prediction at t = 961 is decoded and its foreground centroid (x, y,
pixels) printed, for
  (a) pure noise inputs (as at sampling), and
  (b) real latents of that caption noised to t = 961 (as in training).
If (b) lands in the asked quadrant and (a) does not, the UNet locates the shape from the leaked
signal, not from the words. Real centroids: about (9, 9) TL, (23, 9) TR, (9, 23) BL, (23, 23) BR.

    python benchmarks/probe_toy_leak.py [TOY_DIR] [N]
"""
import sys

import torch

from d2g_fast.toy import data
from d2g_fast.toy.evaluate import decode, load_pipeline, use_ddim
from d2g_fast.toy.train import encode

torch.set_num_threads(1)
folder = sys.argv[1] if len(sys.argv) > 1 else "d2g_fast/toy/weights"
n = int(sys.argv[2]) if len(sys.argv) > 2 else 64
pipe = use_ddim(load_pipeline(f"{folder}/teacher"))
tok, te, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
t = 961
a = pipe.scheduler.alphas_cumprod[t]
ys, xs = torch.meshgrid(torch.arange(32.), torch.arange(32.), indexing="ij")


def centroid(img):
    fg = (img - img.flatten(1).median(1).values[:, None, None]).abs().amax(0)
    return (fg * xs).sum() / fg.sum(), (fg * ys).sum() / fg.sum()


g = torch.Generator().manual_seed(0)
for k, name in enumerate(data.ATTRIBUTES["position"]):
    label = torch.tensor([0, 0, k, 0])
    cap = data.caption(tuple(label.tolist()))
    ids = tok([cap], padding="max_length", max_length=20, return_tensors="pt").input_ids
    # real images of exactly this caption: draw a pool and keep the matching ones
    images, labels, _ = data.sample(4000, 1234 + k)
    real = encode(vae, images[(labels == label).all(1)][:n])
    row = []
    with torch.no_grad():
        ehs = te(ids).last_hidden_state
        for case in ("noise", "leak"):
            eps = torch.randn(real.shape, generator=g)
            z = eps if case == "noise" else a.sqrt() * real + (1 - a).sqrt() * eps
            pred = unet(z, torch.full((len(z),), t), ehs.expand(len(z), -1, -1)).sample
            x0 = (z - (1 - a).sqrt() * pred) / a.sqrt()
            cx, cy = centroid(decode(vae, x0.mean(0, keepdim=True))[0])
            row.append(f"{case}=({cx:.1f},{cy:.1f})")
    print(f"{name:12s} n={len(real)} " + " ".join(row), flush=True)
