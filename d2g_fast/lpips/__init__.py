"""Train your own LatentLPIPS: a latent VGG16-BN trunk trained as a classifier on any VAE's
latents, then non-negative linear heads calibrated on 2AFC judgements, written as ONE
safetensors file that :class:`d2g_fast.ELatentLPIPS` loads for a new encoder name.

Python API (latents are model-space latents, (N, C, H, W) with H, W >= 4; any C)::

    from d2g_fast import ELatentLPIPS
    from d2g_fast.lpips import Triplets, calibrate_heads, train_trunk

    trunk = train_trunk(latents, labels, "my-vae-trunk.safetensors", encoder="my-vae",
                        normalization=(shift, scale), width_div=8, steps=500)
    full = calibrate_heads(trunk, Triplets(ref, p0, p1, judge), "my-vae.safetensors", epochs=10)
    loss_fn = ELatentLPIPS.from_safetensors(full)              # or:
    loss_fn = ELatentLPIPS(encoder="my-vae", heads_path=full)  # the file records the rest

``judge`` follows BAPPS: the fraction of humans who judged p1 closer to the reference.
Command line: ``d2g lpips train-trunk | calibrate | eval`` (see :mod:`d2g_fast.lpips.cli`).
Data readers (latent files, image folders encoded by a diffusers VAE with cached latents, the
BAPPS 2AFC layout): :mod:`d2g_fast.lpips.data`.
"""
from d2g_fast.lpips.calibrate import Triplets, calibrate_heads, two_afc_of_module, two_afc_score
from d2g_fast.lpips.trunk import LatentVGGClassifier, TrunkSettings, train_trunk, trunk_info

__all__ = ["LatentVGGClassifier", "Triplets", "TrunkSettings", "calibrate_heads", "train_trunk",
           "trunk_info", "two_afc_of_module", "two_afc_score"]
