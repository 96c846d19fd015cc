"""DiffusionDiscriminator: built from a teacher UNet, equal to it at initialisation, switches."""
import pytest
import torch
from d2g_helpers import one_thread

from d2g_asserts import assert_close

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402

from d2g_fast.models import DiffusionDiscriminator, DiscriminatorConfig  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def tiny_unet(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
               cross_attention_dim=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    cfg.update(overrides)
    return UNet2DConditionModel(**cfg).eval()


def tiny_sdxl_unet(seed=0):
    # SDXL's added conditions: pooled text embeddings + 6 micro-conditioning time ids.
    return tiny_unet(seed, addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=32 + 6 * 8,
                     transformer_layers_per_block=(1, 2))


def inputs(n=2, hw=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, hw, hw, generator=g), torch.randn(n, 4, hw, hw, generator=g),
            torch.randn(n, 5, 32, generator=g))


def teacher_taps(unet, x, ehs, timestep=0, added=None):
    """The teacher's own features at the discriminator's tap points, read with hooks."""
    taps = {}
    handles = []
    for i, block in enumerate(unet.up_blocks):
        def pre(mod, args, kwargs, i=i):
            taps[f"up{i}.before"] = kwargs["hidden_states"]
        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))

        def res_pre(mod, args, i=i):
            taps[f"up{i}.skip"] = args[0]
        handles.append(block.resnets[0].register_forward_pre_hook(res_pre))
        if block.upsamplers is not None:
            def up_pre(mod, args, i=i):
                taps[f"up{i}.after"] = args[0]
            handles.append(block.upsamplers[0].register_forward_pre_hook(up_pre))
        else:
            def post(mod, args, kwargs, out, i=i):
                taps[f"up{i}.after"] = out
            handles.append(block.register_forward_hook(post, with_kwargs=True))
    with torch.no_grad():
        taps["final"] = unet(x, timestep, ehs, added_cond_kwargs=added).sample
    for h in handles:
        h.remove()
    return taps


def test_features_equal_the_teacher_at_initialisation():
    unet = tiny_unet()
    D = DiffusionDiscriminator.from_unet(unet)
    x, z, c = inputs()
    with torch.no_grad():
        feats = D.all_features(x, z, c)
    expect = teacher_taps(unet, x, c, timestep=D.config.timestep)
    names = [f"up{i}.{p}" for i in range(len(unet.up_blocks)) for p in ("before", "skip", "after")]
    names.append("final")
    assert names == D.head_names
    assert set(expect) == set(names)
    for name, f in zip(names, feats):
        assert_close(f, expect[name], atol=1e-6, name=f"tap {name}")


def test_zero_initialised_branches_are_the_only_difference():
    # The test above could not fail if the branches were ignored: make them non-zero and the
    # features must move; switch them off and they must not exist.
    unet = tiny_unet()
    D = DiffusionDiscriminator.from_unet(unet)
    x, z, c = inputs()
    with torch.no_grad():
        base = D.all_features(x, z, c)[-1]
        D.noise_conv.weight.normal_()
        moved_by_noise = D.all_features(x, z, c)[-1]
        D.noise_conv.weight.zero_()
        D.input_convs[0].weight.normal_()
        moved_by_scale = D.all_features(x, z, c)[-1]
    assert (moved_by_noise - base).abs().max() > 1e-3
    assert (moved_by_scale - base).abs().max() > 1e-3
    bare = DiffusionDiscriminator.from_unet(unet, noise_conditioning=False, multiscale_input=False,
                                            multiscale_output=False)
    assert bare.noise_conv is None and bare.input_convs is None
    assert bare.head_names == ["up1.after"] and len(bare.heads.weight) == 1


def test_teacher_is_untouched_by_training_the_discriminator():
    unet = tiny_unet()
    unet.requires_grad_(False)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    D = DiffusionDiscriminator.from_unet(unet)
    assert all(p.requires_grad for p in D.parameters())
    assert not any(p is q for p in D.parameters() for q in unet.parameters())
    opt = torch.optim.SGD(D.parameters(), lr=0.1)
    x, z, c = inputs()
    D(x, z, c, target=1.0).loss.backward()
    opt.step()
    for k, v in unet.state_dict().items():
        assert torch.equal(v, before[k]), f"teacher tensor {k} changed"
    assert any(not torch.equal(p, q) for p, q in zip(D.unet.parameters(), unet.parameters()))


def test_forward_loss_equals_the_heads_on_the_logit_maps():
    unet = tiny_unet()
    D = DiffusionDiscriminator.from_unet(unet)
    x, z, c = inputs(n=3)
    target = torch.tensor([1.0, -1.0, 1.0])
    out = D(x, z, c, target=target)
    logits = D.logits(x, z, c)
    assert list(logits) == D.head_names
    hw = D.heads.head_weights
    expect = sum(w * torch.nn.functional.softplus(-target.view(-1, 1, 1) * l).mean()
                 for w, l in zip(hw, logits.values()))
    assert_close(out.loss, expect, atol=1e-5, name="loss")
    expect_score = sum(w * l.mean(dim=(1, 2)) for w, l in zip(hw, logits.values()))
    assert_close(out.score, expect_score, atol=1e-5, name="score")
    assert out.scores.shape == (len(D.head_names), 3)


def test_gradient_checkpointing_gives_the_same_gradients():
    unet = tiny_unet()
    x, z, c = inputs()
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(5)  # same head init
        D = DiffusionDiscriminator.from_unet(unet, gradient_checkpointing=ckpt)
        with torch.no_grad():
            D.noise_conv.weight.fill_(0.01)
        out = D(x, z, c, target=torch.tensor([1.0, -1.0]))
        out.loss.backward()
        grads.append([p.grad.clone() for p in D.parameters()])
    for i, (a, b) in enumerate(zip(*grads)):
        assert_close(a, b, atol=1e-5, rtol=1e-4, name=f"param grad {i}")


def test_sdxl_added_conditions():
    unet = tiny_sdxl_unet()
    D = DiffusionDiscriminator.from_unet(unet)
    x, z, c = inputs()
    added = {"text_embeds": torch.randn(2, 32), "time_ids": torch.tensor([[8., 8, 0, 0, 8, 8]] * 2)}
    with torch.no_grad():
        feats = D.all_features(x, z, c, added)
    expect = teacher_taps(unet, x, c, added=added)
    assert_close(feats[-1], expect["final"], atol=1e-6, name="SDXL final")
    # The added conditions reach D: other time ids change its output.
    added2 = {**added, "time_ids": torch.tensor([[16., 16, 0, 0, 16, 16]] * 2)}
    with torch.no_grad():
        assert (D.all_features(x, z, c, added2)[-1] - feats[-1]).abs().max() > 1e-4
    out = D(x, z, c, added, target=1.0)
    out.loss.backward()


def test_bf16_autocast_runs_close_to_fp32():
    unet = tiny_unet()
    D32 = DiffusionDiscriminator.from_unet(unet, mixed_precision="no")
    D16 = DiffusionDiscriminator.from_unet(unet, mixed_precision="bf16")
    D16.load_state_dict(D32.state_dict())
    x, z, c = inputs()
    f16 = D16.features(x, z, c)
    assert f16[0].dtype == torch.bfloat16
    o32, o16 = D32(x, z, c), D16(x, z, c)
    assert o16.loss.dtype == torch.float32
    assert_close(o16.score, o32.score, atol=0.1, name="bf16 score")
    o16.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in D16.heads.parameters())


def test_odd_latent_sizes():
    unet = tiny_unet()
    D = DiffusionDiscriminator.from_unet(unet)
    x, z, c = inputs(hw=7)
    with torch.no_grad():
        feats = D.all_features(x, z, c)
    expect = teacher_taps(unet, x, c)
    assert_close(feats[-1], expect["final"], atol=1e-6, name="odd-size final")


def test_bad_inputs_and_configs():
    unet = tiny_unet()
    D = DiffusionDiscriminator.from_unet(unet)
    x, z, c = inputs()
    with pytest.raises(ValueError, match="noise"):
        D(x, z[:1], c)
    with pytest.raises(ValueError, match="latent"):
        D(x[:, :3], z[:, :3], c)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        D(x, z, c[:1])
    with pytest.raises(ValueError, match="mixed_precision"):
        DiffusionDiscriminator.from_unet(unet, mixed_precision="fp8")
    with pytest.raises(ValueError, match="head_weights"):
        DiffusionDiscriminator(unet, DiscriminatorConfig(head_weights=[1.0]))


def test_new_branches_follow_the_backbone_device():
    with torch.device("meta"):
        unet = tiny_unet()
    D = DiffusionDiscriminator.from_unet(unet)
    assert all(p.device.type == "meta" for p in D.parameters())


def test_build_from_run_options():
    """``build`` (what the trainer and the memory bench call): the run's options become the
    config; the same weights as ``from_unet`` for the same seed; a guidance-conditioned D gets
    G's zero-initialised guidance input (the light D its own ``guidance_proj``); the light D's
    backbone is frozen."""
    from d2g_fast.models import DiscriminatorOptions

    unet = tiny_unet()
    options = DiscriminatorOptions(taps=[9], mixed_precision="no", multiscale_input=False,
                                   multiscale_output=False, guidance=5.0)
    torch.manual_seed(3)
    d = DiffusionDiscriminator.build(unet, options)
    torch.manual_seed(3)
    ref = DiffusionDiscriminator.from_unet(unet, mixed_precision="no", multiscale_input=False,
                                           multiscale_output=False)
    assert d.config == ref.config and d.input_convs is None and len(d.head_names) == 1
    for (k, a), (k2, b) in zip(d.state_dict().items(), ref.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert DiffusionDiscriminator.build(unet).config == DiscriminatorConfig()
    conditioned = DiffusionDiscriminator.build(unet, DiscriminatorOptions(guidance_conditioned=True))
    proj = conditioned.unet.time_embedding.cond_proj
    assert proj.weight.requires_grad and not proj.weight.any()
    assert conditioned.unet.config.time_cond_proj_dim == proj.in_features
    assert getattr(unet.time_embedding, "cond_proj", None) is None  # the teacher untouched
    light = DiffusionDiscriminator.build(unet, DiscriminatorOptions(light=True,
                                                                    guidance_conditioned=True))
    assert not any(p.requires_grad for p in light.unet.parameters())
    assert getattr(light.unet.time_embedding, "cond_proj", None) is None
    assert light.guidance_proj.weight.requires_grad and not light.guidance_proj.weight.any()


@pytest.mark.cuda
def test_discriminator_step_on_gpu_bf16_with_r1():
    from d2g_fast.losses import DiscriminatorLoss
    unet = tiny_unet().cuda()
    x, z, c = (t.cuda() for t in inputs(n=4))
    fake = torch.randn_like(x)
    outs = {}
    for impl in ("cuda", "ref"):
        torch.manual_seed(2)
        D = DiffusionDiscriminator.from_unet(unet, heads_impl=impl)  # bf16 autocast on CUDA
        assert D.features(x, z, c)[0].dtype == torch.bfloat16
        out = DiscriminatorLoss(r1_gamma=1.0, r1_interval=1, mix_fraction=0.5)(
            D, x, fake, z, c, step=0, generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        outs[impl] = (out.gan_loss.detach(), out.r1_penalty.detach(),
                      torch.cat([p.grad.flatten() for p in D.heads.parameters()]))
    assert_close(outs["cuda"][0], outs["ref"][0], atol=1e-3, rtol=1e-3, name="GAN loss cuda vs ref heads")
    assert_close(outs["cuda"][1], outs["ref"][1], atol=1e-3, rtol=1e-2, name="R1 cuda vs ref heads")
    assert_close(outs["cuda"][2], outs["ref"][2], atol=1e-3, rtol=1e-2, name="head grads")


def test_each_discriminator_names_the_run_options_it_reads():
    """The trainer refuses a D flag whose option the teacher's D lacks (--d-taps on a UNet,
    the multi-scale switches on a transformer), from each class's OPTIONS: they must be real
    DiscriminatorOptions fields, and every field must be read by some D."""
    import dataclasses

    from d2g_fast.models.discriminator import DiscriminatorOptions
    from d2g_fast.teacher.families import FAMILIES

    known = {f.name for f in dataclasses.fields(DiscriminatorOptions)}
    classes = {family.discriminator_class() for family in FAMILIES.values()}
    assert DiffusionDiscriminator in classes and len(classes) >= 3
    for cls in classes:
        assert cls.OPTIONS <= known, (cls.__name__, cls.OPTIONS - known)
    assert set().union(*(cls.OPTIONS for cls in classes)) == known
    assert "taps" not in DiffusionDiscriminator.OPTIONS
