"""The discriminator built from SD3 / FLUX transformers (tiny random models, no downloads)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

pytest.importorskip("diffusers")

from d2g_fast.losses import DiscriminatorLoss, generator_loss  # noqa: E402
from d2g_fast.losses.gan import r1_penalty  # noqa: E402
from d2g_fast.models.discriminator import DiscriminatorOptions  # noqa: E402
from d2g_fast.models.transformer_discriminator import (  # noqa: E402
    FluxDiscriminator, SD3Discriminator, TransformerDiscriminator, TransformerDiscriminatorConfig,
    default_taps)
from d2g_fast.teacher.families import FAMILIES  # noqa: E402

TEXT_DIM, POOLED_DIM, TEXT_LEN = 32, 24, 7


def tiny_sd3(seed=0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=3,
                                 attention_head_dim=8, num_attention_heads=2,
                                 joint_attention_dim=TEXT_DIM, caption_projection_dim=16,
                                 pooled_projection_dim=POOLED_DIM, out_channels=16,
                                 pos_embed_max_size=16).eval()


def tiny_flux(seed=0, guidance_embeds=True):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=2,
                                  joint_attention_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM,
                                  guidance_embeds=guidance_embeds,
                                  axes_dims_rope=(4, 6, 6)).eval()


def inputs(n=2, h=8, w=8, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 16, h, w, generator=g, dtype=dtype)
    noise = torch.randn(n, 16, h, w, generator=g, dtype=dtype)
    ehs = torch.randn(n, TEXT_LEN, TEXT_DIM, generator=g, dtype=dtype)
    added = {"pooled_projections": torch.randn(n, POOLED_DIM, generator=g, dtype=dtype)}
    return latent, noise, ehs, added


def stock_block_outputs(transformer, latent, ehs, added, sigma=0.0, guidance=3.5):
    """The image tokens leaving every block of the STOCK forward, as the pipeline calls it."""
    from diffusers import FluxPipeline

    outs = []
    hooks = []
    blocks = list(transformer.transformer_blocks) + \
        list(getattr(transformer, "single_transformer_blocks", []))
    for b in blocks:
        hooks.append(b.register_forward_hook(lambda m, a, out: outs.append(out[1])))
    n, c, h, w = latent.shape
    with torch.no_grad():
        if type(transformer).__name__ == "FluxTransformer2DModel":
            kwargs = {}
            if transformer.config.guidance_embeds:
                kwargs["guidance"] = torch.full((n,), guidance)
            transformer(FluxPipeline._pack_latents(latent, n, c, h, w), encoder_hidden_states=ehs,
                        pooled_projections=added["pooled_projections"],
                        timestep=torch.full((n,), sigma),
                        img_ids=FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, "cpu",
                                                                        latent.dtype),
                        txt_ids=torch.zeros(ehs.shape[1], 3), **kwargs)
        else:
            transformer(latent, encoder_hidden_states=ehs,
                        pooled_projections=added["pooled_projections"],
                        timestep=torch.full((n,), sigma * 1000))
    for hk in hooks:
        hk.remove()
    return outs


BUILDERS = {"sd3": tiny_sd3, "flux": tiny_flux}
# The D class each family names (the only rule that picks a transformer D's subclass).
DISCRIMINATORS = {name: FAMILIES[name].discriminator_class() for name in BUILDERS}


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_features_at_init_are_the_teachers(family):
    """Zero-initialised noise branch: D's tapped tokens equal the stock transformer's block
    outputs for the same input, whatever the noise (so z has no effect at init)."""
    teacher = BUILDERS[family]()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    d = DISCRIMINATORS[family].from_transformer(teacher, taps=[0, 1, 2])
    assert type(d) is {"sd3": SD3Discriminator, "flux": FluxDiscriminator}[family]
    latent, noise, ehs, added = inputs()
    stock = stock_block_outputs(teacher, latent, ehs, added)
    with torch.no_grad():
        mine = d.tap_tokens(latent, noise, ehs, added)
        other = d.tap_tokens(latent, 5 * torch.randn_like(noise), ehs, added)
    for k, t in enumerate([0, 1, 2]):
        torch.testing.assert_close(mine[k], stock[t], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(other[k], mine[k], rtol=0, atol=0)
    # the teacher is untouched
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("family,h,w", [("sd3", 8, 8), ("sd3", 12, 8), ("flux", 8, 8),
                                        ("flux", 8, 12)])
def test_shapes(family, h, w):
    d = DISCRIMINATORS[family].from_transformer(BUILDERS[family]())
    n_blocks = len(d.blocks())
    assert d.taps == default_taps(n_blocks)
    assert len(d.head_names) == len(d.taps) * 3
    latent, noise, ehs, added = inputs(n=3, h=h, w=w)
    feats = d.features(latent, noise, ehs, added)
    p = 2
    gh, gw = h // p, w // p
    assert [tuple(f.shape) for f in feats[:3]] == [
        (3, d.transformer.inner_dim, gh, gw),
        (3, d.transformer.inner_dim, -(-gh // 2), -(-gw // 2)),
        (3, d.transformer.inner_dim, -(-gh // 4), -(-gw // 4))]
    out = d(latent, noise, ehs, added, target=torch.tensor([1.0, -1.0, 1.0]))
    assert out.loss.dim() == 0 and out.scores.shape == (len(d.head_names), 3)
    assert out.score.shape == (3,)
    logits = d.logits(latent, noise, ehs, added)
    assert list(logits) == d.head_names and logits[d.head_names[0]].shape == (3, gh, gw)


def test_default_taps_documented_values():
    assert default_taps(24) == [5, 11, 17, 23]      # SD3-medium
    assert default_taps(57) == [13, 27, 41, 56]     # FLUX.1: 19 double + 38 single
    assert default_taps(3) == [0, 1, 2]
    assert default_taps(1) == [0]


def test_blocks_after_last_tap_do_not_run():
    d = SD3Discriminator.from_transformer(tiny_sd3(), taps=[0])
    ran = []
    for i, b in enumerate(d.blocks()):
        b.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
    d(*inputs())
    assert ran == [0]
    # what D never runs is frozen (no optimiser state)
    assert not any(p.requires_grad for b in d.blocks()[1:] for p in b.parameters())
    assert not any(p.requires_grad for p in d.transformer.proj_out.parameters())
    assert all(p.requires_grad for p in d.blocks()[0].parameters())


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_gradients_reach_heads_noise_branch_and_backbone(family):
    d = DISCRIMINATORS[family].from_transformer(BUILDERS[family]())
    latent, noise, ehs, added = inputs()
    out = DiscriminatorLoss(r1_gamma=0.0, mix_fraction=0.5)(d, latent, latent + 0.3, noise, ehs,
                                                            added)
    out.loss.backward()
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in d.heads.weight)
    assert d.heads.bias.grad.abs().sum() > 0
    # the zero-initialised noise branch gets a gradient, so z can start to matter
    assert d.noise_embed.weight.grad.abs().sum() > 0
    assert d.blocks()[0].ff.net[0].proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_generator_gradient_flows_into_fakes(family):
    d = DISCRIMINATORS[family].from_transformer(BUILDERS[family]())
    latent, noise, ehs, added = inputs()
    fake = latent.clone().requires_grad_(True)
    generator_loss(d, fake, noise, ehs, added).backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_r1_double_backward_float64(family):
    """R1's second derivative through the transformer and the heads: gradgradcheck of the
    score in float64 (heads on the reference math), and the penalty's gradient reaches D."""
    d = DISCRIMINATORS[family].from_transformer(BUILDERS[family](), taps=[1],
                                                heads_impl="ref").double()
    latent, noise, ehs, added = inputs(n=1, h=2, w=4, dtype=torch.float64)

    def score(x):
        return d.score(x, noise, ehs, added)

    x = latent.clone().requires_grad_(True)
    with sdpa_kernel([SDPBackend.MATH]):  # the fused attention kernels have no double backward
        assert torch.autograd.gradgradcheck(score, (x,), eps=1e-6, atol=1e-5, rtol=1e-3,
                                            fast_mode=True)
    penalty = r1_penalty(d, latent, noise, ehs, added)
    penalty.backward()
    assert penalty.item() > 0
    assert d.heads.weight[0].grad.abs().sum() > 0
    assert d.blocks()[0].attn.to_q.weight.grad.abs().sum() > 0


def test_r1_step_in_discriminator_loss_with_checkpointing():
    d = FluxDiscriminator.from_transformer(tiny_flux(), gradient_checkpointing=True)
    latent, noise, ehs, added = inputs()
    added["guidance"] = torch.full((2,), 4.0)
    out = DiscriminatorLoss(r1_gamma=1.0, r1_interval=4)(d, latent, latent * 0.5, noise, ehs,
                                                         added, step=8)
    assert out.r1_penalty is not None and torch.isfinite(out.loss)
    out.loss.backward()
    assert d.config.gradient_checkpointing  # restored after R1


def test_gradient_checkpointing_same_gradients():
    latent, noise, ehs, added = inputs()
    grads = []
    for ckpt in (False, True):
        d = SD3Discriminator.from_transformer(tiny_sd3(), gradient_checkpointing=ckpt)
        d(latent, noise, ehs, added).loss.backward()
        grads.append(d.blocks()[0].attn.to_q.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_flux_guidance_changes_features_only_for_guidance_embedded():
    latent, noise, ehs, added = inputs()
    d = FluxDiscriminator.from_transformer(tiny_flux(guidance_embeds=True))
    a = d.score(latent, noise, ehs, {**added, "guidance": torch.full((2,), 1.0)})
    b = d.score(latent, noise, ehs, {**added, "guidance": torch.full((2,), 7.0)})
    assert not torch.allclose(a, b)
    d2 = FluxDiscriminator.from_transformer(tiny_flux(guidance_embeds=False))
    torch.testing.assert_close(d2.score(latent, noise, ehs, added),
                               d2.score(latent, noise, ehs, {**added, "guidance": torch.ones(2)}))


def test_bad_input_named():
    d = SD3Discriminator.from_transformer(tiny_sd3())
    latent, noise, ehs, added = inputs()
    with pytest.raises(ValueError, match="'latent'"):
        d(latent[:, :4], noise[:, :4], ehs, added)
    with pytest.raises(ValueError, match="patch size"):
        d(latent[..., :7], noise[..., :7], ehs, added)
    with pytest.raises(ValueError, match="'noise'"):
        d(latent, noise[:1], ehs, added)
    with pytest.raises(ValueError, match="'encoder_hidden_states'"):
        d(latent, noise, ehs[:1], added)
    with pytest.raises(ValueError, match="pooled_projections"):
        d(latent, noise, ehs, None)
    with pytest.raises(ValueError, match="taps"):
        SD3Discriminator.from_transformer(tiny_sd3(), taps=[0, 3])
    with pytest.raises(ValueError, match="taps"):
        SD3Discriminator.from_transformer(tiny_sd3(), taps=[2, 1])
    with pytest.raises(ValueError, match="scales"):
        SD3Discriminator.from_transformer(tiny_sd3(), scales=[0])
    with pytest.raises(TypeError, match="base class: build the teacher family's subclass"):
        TransformerDiscriminator.from_transformer(tiny_sd3())


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_build_from_run_options(family):
    """``build`` (what the trainer and the memory bench call): the run's options become the
    config; the same weights as ``from_transformer`` for the same seed; the light D's backbone
    is frozen and holds the same weights."""
    net = BUILDERS[family]()
    options = DiscriminatorOptions(taps=[1], gradient_checkpointing=True, mixed_precision="no",
                                   noise_conditioning=False, guidance=5.0)
    torch.manual_seed(3)
    d = DISCRIMINATORS[family].build(net, options)
    torch.manual_seed(3)
    ref = DISCRIMINATORS[family].from_transformer(net, taps=[1], gradient_checkpointing=True,
                                                  mixed_precision="no", noise_conditioning=False,
                                                  guidance=5.0)
    assert type(d) is type(ref) and d.config == ref.config and d.taps == [1]
    assert d.noise_embed is None
    for (k, a), (k2, b) in zip(d.state_dict().items(), ref.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert DISCRIMINATORS[family].build(net).config == TransformerDiscriminatorConfig()
    torch.manual_seed(3)
    light = DISCRIMINATORS[family].build(net, dataclasses.replace(options, light=True))
    assert not any(p.requires_grad for p in light.transformer.parameters())
    assert light.config == ref.config
    for (k, a), (k2, b) in zip(light.state_dict().items(), ref.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
