"""Diversity and precision / recall in the toy evaluation (d2g_fast.toy.evaluate), on
constructed sample sets scored by the shipped classifier and E-LatentLPIPS."""
import pytest
import torch
from d2g_helpers import one_thread

pytest.importorskip("diffusers")

from d2g_fast import toy  # noqa: E402
from d2g_fast.toy import data  # noqa: E402
from d2g_fast.toy.evaluate import (REAL_SEED, distribution_metrics,  # noqa: E402
                                   distribution_table, real_distribution_metrics,
                                   real_features)

N = 32


@pytest.fixture(scope="module")
def world():
    with one_thread():
        return toy.load_classifier(), toy.load_elatentlpips()


def test_real_samples_score_one_and_a_collapsed_sampler_zero(world):
    clf, lpips = world
    with one_thread():
        real_feats = real_features(clf, N)
        images, _, prompts = data.sample(N, REAL_SEED)  # real_feats' own images
        latents = torch.randn(N, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        same = distribution_metrics(clf, images, latents, prompts, real_feats, lpips=lpips)
        # A sampler that ignores its noise: one picture (and one latent) per caption.
        pair_prompts = data.all_captions()[:N // 2] * 2
        labels = torch.stack([data.parse_caption(p) for p in pair_prompts])
        picture = data.draw(labels[:N // 2], torch.Generator().manual_seed(1)).repeat(2, 1, 1, 1)
        collapsed = distribution_metrics(clf, picture, latents[:N // 2].repeat(2, 1, 1, 1),
                                         pair_prompts, real_feats, lpips=lpips)
        # The same sampler with different pictures of each caption.
        varied = distribution_metrics(
            clf, data.draw(labels, torch.Generator().manual_seed(2)), latents, pair_prompts,
            real_feats, lpips=lpips)
    assert same["precision"] == same["recall"] == 1.0  # the real set itself
    assert same["diversity_features"] > 0  # random captions repeat, with different pictures
    assert collapsed["diversity_features"] == 0.0 and collapsed["diversity_e_latentlpips"] == 0.0
    assert varied["diversity_features"] > 0 and varied["diversity_e_latentlpips"] > 0
    assert 0 <= collapsed["recall"] <= varied["recall"] <= 1
    with one_thread():
        once = distribution_metrics(clf, images[:8], latents[:8], data.all_captions()[:8],
                                    real_feats, lpips=lpips)
    assert once["diversity_features"] is None and once["diversity_e_latentlpips"] is None
    assert once["precision"] is not None  # 8 > k samples


def test_real_reference_values_and_table(world):
    clf, _ = world
    prompts, _ = toy.heldout(144)
    with one_thread():
        real = real_distribution_metrics(clf, prompts, real_features(clf, 512),
                                         vae=toy.load_teacher().vae, lpips=world[1])
    assert real["real_diversity_features"] > 0 and real["real_diversity_e_latentlpips"] > 0
    assert 0.5 < real["real_floor_precision"] <= 1 and 0.5 < real["real_floor_recall"] <= 1
    metrics = {"teacher_multistep": {"diversity_features": 1.5, "diversity_e_latentlpips": 0.25,
                                     "precision": 0.75, "recall": 0.5, **real},
               "student_1step": {"diversity_features": None, "diversity_e_latentlpips": None,
                                 "precision": 1.0, "recall": 0.0, **real}}
    text = "\n".join(distribution_table(metrics))
    assert "| teacher_multistep | 1.500 | 0.2500 | 0.750 | 0.500 |" in text
    assert "| student_1step | - | - | 1.000 | 0.000 |" in text
    assert (f"| real images | {real['real_diversity_features']:.3f} | "
            f"{real['real_diversity_e_latentlpips']:.4f} |") in text
    real["real_diversity_e_latentlpips"] = None  # vae / lpips not given: "-"
    text = "\n".join(distribution_table({"s": {**metrics["student_1step"], **real}}))
    assert f"| real images | {real['real_diversity_features']:.3f} | - |" in text


def test_mismatched_inputs_are_refused(world):
    clf, _ = world
    images, _, prompts = data.sample(8, 0)
    with pytest.raises(ValueError, match="8 images, 4 latents"):
        distribution_metrics(clf, images, torch.zeros(4, 4, 8, 8), prompts, torch.zeros(8, 64))
    with pytest.raises(ValueError, match="real_feats"):
        distribution_metrics(clf, images, torch.zeros(8, 4, 8, 8), prompts, torch.zeros(4, 64))
