"""A short teacher-stage experiment (issue 25): retrain only the toy teacher (text encoder +
UNet) on the shipped VAE's latents with a variant UNet, then the 25-step guided teacher's FD and
per-attribute accuracy on the 144 held-out prompts by the shipped classifier.

    python benchmarks/probe_toy_teacher_variant.py VARIANT STEPS

VARIANT: "base" (the shipped architecture), "l3" (a third UNet level: 8x8 -> 4x4 -> 2x2, where
each cell of the 2x2 level is one quadrant, i.e. one position word), "lr" (base, lr 2e-3).
Writes /tmp/y/exp_VARIANT/.
"""
import sys, time, torch, copy
torch.set_num_threads(1)
from pathlib import Path
from d2g_fast.toy import train as T, models, data
from d2g_fast.toy.evaluate import *
variant, steps = sys.argv[1], int(sys.argv[2])
out = Path(f"/tmp/y/exp_{variant}")
quiet_diffusers()
from diffusers import AutoencoderKL, UNet2DConditionModel
vae = AutoencoderKL.from_pretrained("d2g_fast/toy/weights/teacher/vae").eval().requires_grad_(False)
s = T.ToySettings(unet_steps=steps)
if variant == "lr":
    s.unet_lr = 2e-3
orig = models.build_unet
def build3(seed):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
        addition_embed_type="text", addition_embed_type_num_heads=4)
if variant == "l3":
    models.build_unet = build3
pool = T.latent_pool(vae, s, 0)
tok = models.build_tokenizer(str(out / "tok"))
t0 = time.time()
te, unet = T.train_denoiser(pool, tok, s, 0, False)
print("params", sum(p.numel() for p in unet.parameters()), "train s", time.time() - t0, flush=True)
T.save_teacher(out / "teacher", vae, te, unet, tok)
pipe = use_ddim(load_pipeline(out / "teacher"))
clf = load_classifier("d2g_fast/toy/weights/classifier.safetensors")
prompts, noise = heldout(144)
real = real_features(clf, 512)
lat = pipeline_latents(pipe, prompts, noise, 25, 4.0)
print(variant, steps, image_metrics(clf, decode(pipe.vae, lat), prompts, real), flush=True)
