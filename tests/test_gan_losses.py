"""GAN losses: non-saturating G/D losses, mix-and-match, lazy single-sample R1, and a tiny
discriminator that learns to separate matched from mismatched (noise, prompt, latent) triples."""
import time

import pytest
import torch
from d2g_helpers import one_thread
import torch.nn.functional as F

from d2g_asserts import assert_close

pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402

from d2g_fast.losses import DiscriminatorLoss, generator_loss, mix_and_match, r1_penalty  # noqa: E402
from d2g_fast.models import DiffusionDiscriminator  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def inputs(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 4, 8, 8, generator=g),
            torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 5, 32, generator=g))


def test_mix_and_match_replaces_a_fraction_with_other_samples_reals():
    real = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 4, 2, 2).contiguous()
    fake = -torch.ones(8, 4, 2, 2)
    for fraction, count in ((0.0, 0), (0.25, 2), (0.5, 4), (1.0, 8)):
        neg, mask = mix_and_match(real, fake, fraction, torch.Generator().manual_seed(count))
        assert int(mask.sum()) == count
        assert torch.equal(neg[~mask], fake[~mask])
        for i in mask.nonzero().flatten().tolist():
            donor = int(neg[i, 0, 0, 0])
            assert donor != i and torch.equal(neg[i], real[donor]), "a mixed negative must be another sample's real"
    one, mask = mix_and_match(real[:1], fake[:1], 1.0)
    assert torch.equal(one, fake[:1]) and not mask.any()
    with pytest.raises(ValueError, match="fraction"):
        mix_and_match(real, fake, 1.5)


def test_discriminator_loss_is_the_non_saturating_loss():
    D = DiffusionDiscriminator.from_unet(tiny_unet())
    real, fake, z, c = inputs()
    loss_fn = DiscriminatorLoss(r1_gamma=0.0, mix_fraction=0.0)
    out = loss_fn(D, real, fake, z, c, step=0)
    assert out.r1_penalty is None
    hw = D.heads.head_weights

    def expected(x, sign):
        logits = D.logits(x, z, c).values()
        return sum(w * F.softplus(-sign * l).mean() for w, l in zip(hw, logits))

    assert_close(out.gan_loss, expected(real, 1.0) + expected(fake, -1.0), atol=1e-5, name="D loss")
    assert_close(out.real_score, D.score(real, z, c), atol=1e-5, name="real score")
    g = generator_loss(D, fake, z, c)
    assert_close(g, expected(fake, 1.0), atol=1e-5, name="G loss")


def test_generator_loss_reaches_the_generator_output():
    D = DiffusionDiscriminator.from_unet(tiny_unet())
    D.requires_grad_(False)
    _, fake, z, c = inputs()
    fake.requires_grad_(True)
    generator_loss(D, fake, z, c).backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0


def test_lazy_r1_runs_on_its_interval_and_scales_with_it():
    D = DiffusionDiscriminator.from_unet(tiny_unet())
    real, fake, z, c = inputs()
    loss_fn = DiscriminatorLoss(r1_gamma=2.0, r1_interval=4, mix_fraction=0.0)
    assert [loss_fn.is_r1_step(s) for s in range(6)] == [True, False, False, False, True, False]
    out = loss_fn(D, real, fake, z, c, step=4)
    assert out.r1_penalty is not None and out.r1_penalty > 0
    assert_close(out.loss, out.gan_loss + 0.5 * 2.0 * 4 * out.r1_penalty, atol=1e-6, name="loss")
    off = loss_fn(D, real, fake, z, c, step=5)
    assert off.r1_penalty is None
    # Single sample: the penalty only looks at the first real latent.
    p1 = r1_penalty(D, real[:1], z[:1], c[:1])
    assert_close(out.r1_penalty, p1, atol=1e-6, name="single-sample R1")


def test_r1_penalty_is_exact_through_the_fused_heads():
    # R1 differentiates the fused heads twice: the automatic switch to the reference inside the
    # double backward must give the same penalty and the same parameter gradients.
    real, _, z, c = inputs(n=1)
    unet = tiny_unet()
    results = []
    for impl in ("auto", "ref"):
        torch.manual_seed(3)
        D = DiffusionDiscriminator.from_unet(unet, heads_impl=impl)
        with torch.no_grad():
            D.noise_conv.weight.fill_(0.02)
        p = r1_penalty(D, real, z, c)
        p.backward()
        results.append((p.detach(), [torch.zeros_like(q) if q.grad is None else q.grad.clone()
                                     for q in D.parameters()]))
    assert_close(results[0][0], results[1][0], atol=1e-6, rtol=1e-5, name="R1 penalty")
    for i, (a, b) in enumerate(zip(results[0][1], results[1][1])):
        assert_close(a, b, atol=1e-6, rtol=1e-4, name=f"R1 grad of parameter {i}")
    assert any(g.abs().sum() > 0 for g in results[0][1][:-1])


def test_r1_with_gradient_checkpointing():
    D = DiffusionDiscriminator.from_unet(tiny_unet(), gradient_checkpointing=True)
    real, fake, z, c = inputs()
    out = DiscriminatorLoss(r1_gamma=1.0, r1_interval=1)(D, real, fake, z, c, step=0)
    out.loss.backward()
    assert D.config.gradient_checkpointing, "R1 must restore the checkpointing setting"


def test_losses_under_autocast():
    D = DiffusionDiscriminator.from_unet(tiny_unet())
    real, fake, z, c = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = DiscriminatorLoss(r1_gamma=1.0, r1_interval=1, mix_fraction=0.5)(D, real, fake, z, c)
        g = generator_loss(D, fake, z, c)
    (out.loss + g).backward()
    assert torch.isfinite(out.loss) and torch.isfinite(g)


def test_bad_loss_configs():
    for kw, name in ((dict(r1_interval=0), "r1_interval"), (dict(r1_gamma=-1.0), "r1_gamma"),
                     (dict(mix_fraction=2.0), "mix_fraction"), (dict(r1_samples=0), "r1_samples")):
        with pytest.raises(ValueError, match=name):
            DiscriminatorLoss(**kw)


# ------------------------------------------------------------------ learning to judge triples
class SyntheticTeacher:
    """A fixed random 'teacher': latent = M z (an orthogonal channel mix of the noise) plus a
    per-channel offset given by the prompt embedding. Matched and mismatched triples differ only
    in whether the latent fits its (noise, prompt)."""

    def __init__(self, seed=7):
        g = torch.Generator().manual_seed(seed)
        self.mix = torch.linalg.qr(torch.randn(4, 4, generator=g))[0]
        self.text = torch.randn(32, 4, generator=g) * (2 / 32 ** 0.5)

    def __call__(self, z, c):
        return torch.einsum("ij,njhw->nihw", self.mix, z) + (c.mean(1) @ self.text).view(-1, 4, 1, 1)

    def sample(self, n, gen):
        z = torch.randn(n, 4, 8, 8, generator=gen)
        c = torch.randn(n, 4, 32, generator=gen)
        return z, c, self(z, c)


def test_tiny_discriminator_separates_matched_from_mismatched_triples():
    teacher = SyntheticTeacher()
    D = DiffusionDiscriminator.from_unet(tiny_unet())
    # Negatives: mix-and-match only (other samples' teacher latents, conditions kept).
    loss_fn = DiscriminatorLoss(r1_gamma=0.0, mix_fraction=1.0)
    opt = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.0, 0.99))
    gen = torch.Generator().manual_seed(1)
    start = time.time()
    steps = 250
    for step in range(steps):
        z, c, x = teacher.sample(8, gen)
        out = loss_fn(D, x, x, z, c, step=step, generator=gen)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    train_s = time.time() - start
    held = torch.Generator().manual_seed(123)  # held-out triples, never trained on
    z, c, x = teacher.sample(128, held)
    z2, c2, x2 = teacher.sample(128, held)
    with torch.no_grad():
        s_matched = D.score(x, z, c)
        s_mismatched = D.score(x2, z, c)
    accuracy = 0.5 * ((s_matched > 0).float().mean() + (s_mismatched < 0).float().mean()).item()
    ranking = (s_matched > s_mismatched).float().mean().item()
    print(f"tiny D: {steps} steps in {train_s:.1f} s; held-out accuracy {accuracy:.3f}, "
          f"pairwise ranking {ranking:.3f}")
    assert accuracy >= 0.8, f"held-out accuracy {accuracy:.3f} (ranking {ranking:.3f})"
    assert ranking >= 0.9, f"held-out pairwise ranking {ranking:.3f}"


def test_discriminator_loss_with_sdxl_added_conditions():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)
    D = DiffusionDiscriminator.from_unet(unet)
    real, fake, z, c = inputs(n=3)
    added = {"text_embeds": torch.randn(3, 32), "time_ids": torch.tensor([[8., 8, 0, 0, 8, 8]] * 3)}
    out = DiscriminatorLoss(r1_gamma=1.0, r1_interval=1, mix_fraction=0.5)(D, real, fake, z, c, added)
    out.loss.backward()
    assert out.r1_penalty is not None and torch.isfinite(out.loss)
    # The real half of the batched call saw the real conditions: same score as a direct call.
    assert_close(out.real_score, D.score(real, z, c, added), atol=1e-5, name="real score with added")
    g = generator_loss(D, fake, z, c, added)
    assert torch.isfinite(g)
