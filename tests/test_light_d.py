"""The light discriminator (d2g distill --light-d, issue 22 item 2) on tiny teachers: only D's
additions (z-conditioning, input convs, heads, guidance input) train, get AdamW state and are
checkpointed; with a LoRA G, D runs G's network with the adapters off (one copy of the
teacher's network: D owns no backbone parameter) and its output equals the light D on the plain
teacher (SD UNet and FLUX-dev transformer, with gradient checkpointing's recompute too); a
SIGKILL while writing a checkpoint resumes exactly (the full-G form with
D2G_TEST_LIGHT_D_SLOW=1); D's input gradient and R1's double backward
pass float64 gradcheck/gradgradcheck; bad combinations are refused by flag, nothing written;
d2g plan --light-d matches the measured CPU peak of a light-D step within 15 % (one case in CI,
all with D2G_TEST_LIGHT_D_SLOW=1); torchrun 2 processes == 1 process x 2 micro-batches
(D2G_TEST_LIGHT_D_SLOW=1), and FSDP2 with the light D of a full G, resumed once, == 1 process
(ditto)."""
import contextlib
import dataclasses
import os
import subprocess

import pytest
import torch
from d2g_helpers import assert_resume_after_sigkill_while_writing_is_exact, one_thread

pytest.importorskip("peft")
pytest.importorskip("diffusers")

from d2g_fast.train import TrainConfig, train  # noqa: E402
from test_train import _config, _distill_cmd, _env, _rows, _world  # noqa: E402

LIGHT = dict(light_d=True)
LIGHT_LORA = dict(light_d=True, lora_rank=4, lora_alpha=8.0)
D_ADDITIONS = {"noise_conv", "input_convs", "heads", "guidance_proj", "noise_embed"}


@pytest.fixture(autouse=True)
def _one_thread_light():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with one_thread():
        return _world(str(tmp_path_factory.mktemp("light_world")), "v_prediction", pairs=24)


@pytest.fixture(scope="module", params=["full G", "LoRA G"])
def light_run(request, world, tmp_path_factory):
    kw = LIGHT if request.param == "full G" else LIGHT_LORA
    config = _config(world, tmp_path_factory.mktemp("light_run") / "run", max_steps=4,
                     ema_decay=0.5, **kw)
    with one_thread():
        train(config, log=lambda *a: None)
    return config


def _checkpoint(run_dir):
    from d2g_fast.train.checkpoint import latest_checkpoint

    return latest_checkpoint(run_dir)


def _storage_bytes(*modules) -> int:
    """Bytes of the distinct parameter storages of ``modules`` (memory as the planner counts)."""
    seen, total = set(), 0
    for m in modules:
        for p in m.parameters():
            s = p.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
    return total


def test_only_d_additions_train_get_optimiser_state_and_are_checkpointed(world, light_run):
    from safetensors.torch import load_file

    from d2g_fast.models.light_discriminator import backbone_of, is_shared
    from d2g_fast.teacher import Teacher
    from d2g_fast.train.build import build_run
    from d2g_fast.train.checkpoint import load_checkpoint

    path = _checkpoint(light_run.out)
    saved = load_file(os.path.join(path, "discriminator.safetensors"))
    run = build_run(light_run)
    load_checkpoint(run, path)
    d = run.discriminator
    trainable = {n for n, p in d.named_parameters() if p.requires_grad}
    assert trainable == set(saved)
    assert {n.split(".")[0] for n in trainable} == {"noise_conv", "input_convs", "heads"}
    # the z-conditioning moved from zero: D's additions trained
    assert saved["noise_conv.weight"].abs().max() > 0
    # AdamW holds moments of D's additions only
    assert {id(p) for p in run.opt_d.state} == {id(p) for p in d.parameters() if p.requires_grad}
    opt_tensors = sum(v.numel() for s in run.opt_d.state.values() for v in s.values()
                      if torch.is_tensor(v) and v.ndim > 0)
    assert opt_tensors == 2 * sum(t.numel() for t in saved.values())
    # the backbone is the teacher's, frozen, after training
    teacher = dict(Teacher.from_pretrained(light_run.teacher).denoiser.named_parameters())
    backbone = backbone_of(d)
    for name, p in backbone.named_parameters():
        if ".lora_" in name:
            continue
        assert torch.equal(p.detach(), teacher[name.replace(".base_layer.", ".")].detach()), name
        if not light_run.lora_rank:
            assert not p.requires_grad and p.grad is None
    if light_run.lora_rank:  # one copy of the teacher's network: D runs G's
        g = run.generator
        assert is_shared(d) and backbone is g.net
        assert not {id(p) for p in d.parameters()} & {id(p) for p in g.parameters()}
        d_added = sum(p.numel() * p.element_size() for p in d.parameters())
        assert _storage_bytes(g, d) == _storage_bytes(g) + d_added
        assert d_added < 0.01 * _storage_bytes(g)
        # G's adapters train as before (D switched them off and back)
        assert all(p.requires_grad for n, p in g.net.named_parameters() if ".lora_" in n)
    else:  # its own frozen copy
        assert not is_shared(d)
        assert _storage_bytes(d) > _storage_bytes(run.generator) * 0.9


@pytest.mark.parametrize("kw", [
    pytest.param(LIGHT, marks=pytest.mark.skipif(
        os.environ.get("D2G_TEST_LIGHT_D_SLOW") != "1",
        reason="the full-G form with D2G_TEST_LIGHT_D_SLOW=1 (the LoRA form runs in CI)")),
    LIGHT_LORA], ids=["full G", "LoRA G"])
def test_resume_after_sigkill_while_writing_a_checkpoint_is_exact(world, tmp_path, kw):
    assert_resume_after_sigkill_while_writing_is_exact(
        lambda name: _config(world, tmp_path / name, max_steps=6, **kw), _distill_cmd, _env)


# ------------------------------------------------------------------ D on G's network == plain
def _tiny_teacher(kind, folder):
    from d2g_fast.testing.tiny import save_tiny_flux_pipeline, save_tiny_sd_pipeline

    return {"sd": save_tiny_sd_pipeline, "flux": save_tiny_flux_pipeline}[kind](folder)


@pytest.mark.parametrize("kind", ["sd", "flux"])
def test_d_on_the_lora_g_equals_the_light_d_on_the_plain_teacher(kind, tmp_path):
    """With the adapters made non-zero, D (running G's network, adapters off) == the light D
    with its own copy of the teacher and the same trained parts: the score and R1's input
    gradient, with gradient checkpointing (the recompute runs with the adapters off too)."""
    from d2g_fast.models.light_discriminator import backbone_of, is_shared
    from d2g_fast.teacher import Teacher
    from d2g_fast.train.build import build_run, make_discriminator

    folder = _tiny_teacher(kind, str(tmp_path / kind))
    teacher = Teacher.from_pretrained(folder)
    config = TrainConfig(teacher=folder, pairs="-", out=str(tmp_path / "run"),
                         lpips_random=True, batch_size=2, gradient_checkpointing=True,
                         **LIGHT_LORA)
    run = build_run(config, teacher=teacher, guidance=3.5)
    d, g = run.discriminator, run.generator
    assert is_shared(d) and backbone_of(d) is g.net
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in g.net.named_parameters():
            if ".lora_B." in name:  # adapters that change the network
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        for p in d.parameters():   # D's additions away from their zero start
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    plain = make_discriminator(teacher, dataclasses.replace(config, lora_rank=0), guidance=3.5)
    result = plain.load_state_dict(d.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all(k.split(".")[0] in ("unet", "transformer") for k in result.missing_keys)
    n = 2
    latent = torch.randn(n, *teacher.latent_shape, generator=gen)
    noise = torch.randn(n, *teacher.latent_shape, generator=gen)
    with torch.no_grad():
        cond = teacher.encode_prompts(["a red fox", "x"], guided=False)

    def score_and_grad(disc):
        x = latent.clone().requires_grad_(True)
        score = disc(x, noise, cond.encoder_hidden_states, cond.added_cond_kwargs).score
        (grad,) = torch.autograd.grad(score.sum(), x)
        return score.detach(), grad

    ours, theirs = score_and_grad(d), score_and_grad(plain)
    for a, b in zip(ours, theirs):
        assert float((a - b).norm() / b.norm()) < 1e-6
    # the switch matters: with the adapters on, D would judge with G's adapted network
    d.backbone_context = contextlib.nullcontext
    with torch.no_grad():
        adapted = d(latent, noise, cond.encoder_hidden_states, cond.added_cond_kwargs).score
    assert float((adapted - theirs[0]).norm() / theirs[0].norm()) > 1e-4
    # and the adapters are on again, still trainable, for G
    assert all(p.requires_grad for n_, p in g.net.named_parameters() if ".lora_" in n_)
    assert not any(m.disable_adapters for m in g.net.modules() if hasattr(m, "lora_A"))


def test_guidance_input_of_a_light_d_equals_the_unets_own():
    """A guidance-conditioned light D's own ``guidance_proj`` adds where diffusers'
    ``time_embedding.cond_proj`` adds: equal to a D whose UNet has that input."""
    from d2g_fast.models import DiffusionDiscriminator
    from d2g_fast.models.light_discriminator import add_guidance_proj, light_discriminator
    from d2g_fast.models.discriminator import DiscriminatorConfig
    from d2g_fast.teacher.families.sd import GUIDANCE_EMBED_DIM, SDFamily
    from d2g_fast.testing.tiny import tiny_sd_components

    torch.manual_seed(0)
    unet = tiny_sd_components()["unet"]
    light = light_discriminator(DiffusionDiscriminator, DiscriminatorConfig(), unet)
    add_guidance_proj(light, GUIDANCE_EMBED_DIM)
    assert light.guidance_proj.weight.requires_grad
    full = DiffusionDiscriminator.from_unet(unet)
    SDFamily.add_guidance_input(None, full.unet)
    with torch.no_grad():
        light.guidance_proj.weight.normal_()
        full.unet.time_embedding.cond_proj.weight.copy_(light.guidance_proj.weight)
    full.load_state_dict(light.state_dict(), strict=False)
    x, z = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    ehs = torch.randn(2, 7, unet.config.cross_attention_dim)
    added = {"guidance": torch.tensor([2.0, 6.0])}
    with torch.no_grad():
        a, b = light.score(x, z, ehs, added), full.score(x, z, ehs, added)
        unguided = light.score(x, z, ehs, None)
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(a, unguided)


# ------------------------------------------------------------------ R1 through the frozen D
def test_float64_gradcheck_of_d_with_respect_to_its_input():
    """D's input gradient (R1's penalty) and its double backward (R1's gradient into D's
    additions) through the frozen backbone, in float64 on a tiny UNet D."""
    from d2g_fast.models import DiffusionDiscriminator
    from d2g_fast.models.discriminator import DiscriminatorConfig
    from d2g_fast.models.light_discriminator import light_discriminator
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from d2g_fast.testing.tiny import tiny_sd_components

    torch.manual_seed(0)
    unet = tiny_sd_components()["unet"].double()
    d = light_discriminator(DiffusionDiscriminator, DiscriminatorConfig(mixed_precision="no",
                                                                        heads_impl="ref"), unet)
    d = d.double()
    with torch.no_grad():
        for p in d.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    z = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    ehs = torch.randn(1, 3, unet.config.cross_attention_dim, dtype=torch.float64)
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64, requires_grad=True)

    def score(latent):
        return d.score(latent, z, ehs)

    # attention's double backward: the MATH backend, as r1_penalty runs it
    with sdpa_kernel([SDPBackend.MATH]):
        assert torch.autograd.gradcheck(score, (x,), fast_mode=True)
        assert torch.autograd.gradgradcheck(score, (x,), fast_mode=True)
        # R1's penalty reaches D's additions and leaves the backbone without gradients
        (grad,) = torch.autograd.grad(score(x).sum(), x, create_graph=True)
        grad.square().sum().backward()
    assert d.noise_conv.weight.grad is not None and d.noise_conv.weight.grad.abs().max() > 0
    assert all(p.grad is None for p in d.unet.parameters())


# ------------------------------------------------------------------ refusals
def test_bad_combinations_are_refused_naming_the_flag(world, light_run, tmp_path):
    from d2g_fast.train.checkpoint import list_checkpoints

    with pytest.raises(ValueError, match="--light-d"):
        TrainConfig(teacher="t", pairs="p", out="o", fsdp=True, **LIGHT_LORA).validate()
    out = tmp_path / "fsdp"
    with pytest.raises(ValueError, match="--light-d"):
        train(_config(world, out, fsdp=True, **LIGHT_LORA), log=lambda *a: None)
    assert not out.exists()
    # resuming a light-D run with the full D (and back) is refused; nothing changes
    before = list_checkpoints(light_run.out)
    rows = _rows(light_run.out)
    other = dataclasses.replace(light_run, light_d=False, max_steps=6)
    with pytest.raises(ValueError, match="--light-d"):
        train(other, log=lambda *a: None)
    assert list_checkpoints(light_run.out) == before and _rows(light_run.out) == rows


# ------------------------------------------------------------------ d2g plan --light-d
PLAN_CASES = [  # (UNet width, latent side, batch, TrainConfig options)
    (32, 16, 3, LIGHT_LORA),
    pytest.param(32, 16, 3, LIGHT, marks=pytest.mark.skipif(
        os.environ.get("D2G_TEST_LIGHT_D_SLOW") != "1", reason="D2G_TEST_LIGHT_D_SLOW=1")),
    pytest.param(48, 24, 2, dict(LIGHT_LORA, lora_rank=8), marks=pytest.mark.skipif(
        os.environ.get("D2G_TEST_LIGHT_D_SLOW") != "1", reason="D2G_TEST_LIGHT_D_SLOW=1")),
]


@pytest.mark.parametrize("width, latent, batch, options", PLAN_CASES)
def test_plan_matches_a_measured_cpu_peak_with_the_light_d(width, latent, batch, options):
    """d2g plan --light-d (the trainer's build_run on fake tensors) against the profiler's peak
    of a real CPU step of the same run (d2g_fast.plan.measure), within 15 % (models and batch
    sizes other than the plan's calibration cases); the light D's state rows shrink."""
    from d2g_fast.plan import calibrate
    from d2g_fast.plan.fake import portable_trunk
    from d2g_fast.plan.measure import measure_step
    from d2g_fast.plan.planner import PlanRequest, plan, simulate

    def request(opts):
        return PlanRequest(calibrate.shaped(width, latent), batch_size=batch, gpus=1,
                           gpu_memory_gb=1e6, device="cpu", options=opts).check()

    req = request(options)
    with portable_trunk():
        measured = measure_step(req.source, req.train_config(), batch)
    timeline, state, _ = simulate(req)
    predicted = plan(req, timeline=timeline, state=state, max_batch=1).peak
    assert abs(predicted / measured["total"] - 1) < 0.15, (predicted, measured)
    full = plan(request({k: v for k, v in options.items() if k != "light_d"}), max_batch=1)
    light_rows, full_rows = dict(plan(req, timeline=timeline, state=state,
                                      max_batch=1).rows), dict(full.rows)
    assert light_rows["AdamW states (G, D)"] < full_rows["AdamW states (G, D)"]
    if options.get("lora_rank"):  # D's backbone is G's: D's own weights are its additions
        assert light_rows["weights: D"] < 0.01 * full_rows["weights: D"]


@pytest.mark.skipif(os.environ.get("D2G_TEST_LIGHT_D_SLOW") != "1",
                    reason="torchrun form: D2G_TEST_LIGHT_D_SLOW=1")
def test_two_processes_match_one_at_the_same_global_batch(world, tmp_path):
    """A LoRA G with the light D on 2 processes x 1 micro-batch == 1 process x 2 (replicated,
    gloo): D's additions are averaged like every trained parameter."""
    from safetensors.torch import load_file
    from test_train import _assert_same_metrics, _torchrun

    one = _config(world, tmp_path / "one", max_steps=4, batch_size=2, grad_accum=2, **LIGHT_LORA)
    proc = subprocess.run(_distill_cmd(one), env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = _config(world, tmp_path / "two", max_steps=4, batch_size=2, **LIGHT_LORA)
    _torchrun(two, 29547)
    _assert_same_metrics(_rows(one.out), _rows(two.out), rel=1e-4)
    d1, d2 = (load_file(os.path.join(r, "checkpoints", "step-0000004",
                                     "discriminator.safetensors")) for r in (one.out, two.out))
    assert set(d1) == set(d2)
    apart = torch.cat([(d1[k] - d2[k]).flatten() for k in d1]).norm()
    moved = d1["noise_conv.weight"].norm()
    assert moved > 0 and apart < 0.01 * torch.cat([t.flatten() for t in d1.values()]).norm()


@pytest.mark.skipif(os.environ.get("D2G_TEST_LIGHT_D_SLOW") != "1",
                    reason="torchrun FSDP2 form: D2G_TEST_LIGHT_D_SLOW=1")
def test_fsdp_light_d_with_a_full_g_matches_one_process(world, tmp_path):
    """The light D of a full G (its own frozen copy) sharded by FSDP2 on 2 processes, resumed
    once, computes what 1 process x 2 micro-batches computes."""
    from test_train import _assert_same_metrics, _torchrun

    one = _config(world, tmp_path / "one", max_steps=4, batch_size=2, grad_accum=2, **LIGHT)
    proc = subprocess.run(_distill_cmd(one), env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = _config(world, tmp_path / "fsdp", max_steps=2, batch_size=2, fsdp=True, **LIGHT)
    _torchrun(sharded, 29548)
    _torchrun(dataclasses.replace(sharded, max_steps=4), 29549)  # resumes from step 2
    _assert_same_metrics(_rows(one.out), _rows(sharded.out), rel=1e-4)
