"""Where the toy teacher loses the position words (issue 25), on the shipped toy world:

1. the 25-step guided teacher's FD and per-attribute accuracy on the 144 held-out prompts,
   the confusion of the position attribute (rows: predicted, columns: asked), whether the text
   encoder's outputs differ between captions that differ only in position (L2 distances of the
   last hidden states), and the foreground centroid (x, y, in pixels) of the samples per asked
   position;
2. the mean x0 prediction of the teacher UNet for the four position captions (shape, colour,
   background fixed) at several noise levels, decoded, and its foreground centroid. Real
   images' centroids: about (9, 9) top left, (23, 9) top right, (9, 23) bottom left, (23, 23)
   bottom right.

    python benchmarks/probe_toy_position.py [TOY_DIR]
"""
import sys, torch, time
torch.set_num_threads(1)
from d2g_fast.toy.evaluate import *
from pathlib import Path
folder = Path(sys.argv[1] if len(sys.argv)>1 else "d2g_fast/toy/weights")
pipe = use_ddim(load_pipeline(folder / "teacher"))
clf = load_classifier("d2g_fast/toy/weights/classifier.safetensors")
prompts, noise = heldout(144)
real = real_features(clf, 512)
t=time.time()
lat = pipeline_latents(pipe, prompts, noise, 25, 4.0)
m = image_metrics(clf, decode(pipe.vae, lat), prompts, real)
print(m, time.time()-t)
labels = torch.stack([data.parse_caption(p) for p in prompts])
pred = clf.predict(decode(pipe.vae, lat))
print(torch.bincount(pred[:,2]*4+labels[:,2], minlength=16).view(4,4))
# text encoder: do position words change hidden states?
tok = pipe.tokenizer; te = pipe.text_encoder
caps = [data.caption((0,0,k,0)) for k in range(4)]
ids = tok(caps, padding="max_length", max_length=20, return_tensors="pt").input_ids
print(ids)
with torch.no_grad(): h = te(ids).last_hidden_state
for k in range(4): print([round((h[k]-h[j]).norm().item(),2) for j in range(4)])
# energy centre of mass of decoded images (foreground)
img = decode(pipe.vae, lat)
bg = img.flatten(2).median(2).values[:,:,None,None]
fg = (img-bg).abs().amax(1)
ys, xs = torch.meshgrid(torch.arange(32.), torch.arange(32.), indexing="ij")
cy = (fg*ys).sum((1,2))/fg.sum((1,2)); cx=(fg*xs).sum((1,2))/fg.sum((1,2))
for k in range(4):
    s = labels[:,2]==k; print(k, cx[s].mean().item(), cy[s].mean().item(), cx[s].std().item())

# ---- 2. the UNet's x0 prediction per position caption
torch.set_num_threads(1)
from d2g_fast.toy.evaluate import *
from d2g_fast.toy import data
pipe = use_ddim(load_pipeline(folder / "teacher"))
tok, te, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
ac = pipe.scheduler.alphas_cumprod
caps = [data.caption((0, 0, k, 0)) for k in range(4)] + [""]
ids = tok(caps, padding="max_length", max_length=20, return_tensors="pt").input_ids
with torch.no_grad():
    ehs = te(ids).last_hidden_state
g = torch.Generator().manual_seed(0)
n = 32
x0 = torch.randn(n, 4, 8, 8, generator=g)
ys, xs = torch.meshgrid(torch.arange(32.), torch.arange(32.), indexing="ij")
for t in (999, 900, 700, 400):
    a = ac[t]
    z = torch.randn(n, 4, 8, 8, generator=g)
    row = []
    for k in range(5):
        with torch.no_grad():
            eps = unet(z, torch.full((n,), t), ehs[k:k+1].expand(n, -1, -1)).sample
            x0p = (z - (1 - a).sqrt() * eps) / a.sqrt()
            img = vae.decode(x0p.mean(0, keepdim=True) / vae.config.scaling_factor).sample[0]
        fg = (img - img.flatten(1).median(1).values[:, None, None]).abs().amax(0)
        cx = (fg * xs).sum() / fg.sum(); cy = (fg * ys).sum() / fg.sum()
        row.append(f"{['TL','TR','BL','BR','uncond'][k]}=({cx:.1f},{cy:.1f})")
    print(t, " ".join(row), flush=True)
