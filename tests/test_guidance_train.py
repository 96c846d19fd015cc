"""A guidance-conditioned one-step student (issue 21, parts 2-3): G's and D's zero-initialised
guidance inputs, G at initialisation equal to the unconditioned G (the teacher's one-step
prediction), the guidance embedding the stock pipeline computes; on a multi-guidance store exact
resume and 2 processes == 1 (FSDP2 form with D2G_TEST_GUIDANCE_SLOW=1); the exported stock SD,
SDXL and FLUX-dev pipelines at each scale == G at that scale."""
import json
import os

import pytest
import torch
from d2g_helpers import one_thread, sigkill_after_checkpoint, weights_apart

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from d2g_fast.teacher import Teacher  # noqa: E402
from d2g_fast.teacher.families.sd import guidance_embedding  # noqa: E402
from d2g_fast.testing import save_tiny_sd_pipeline, save_tiny_sdxl_pipeline  # noqa: E402
from d2g_fast.train.generator import make_generator, middle_guidance  # noqa: E402

SET = {"values": [2.0, 4.5, 8.0]}
SLOW = os.environ.get("D2G_TEST_GUIDANCE_SLOW") == "1"


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return save_tiny_sd_pipeline(str(tmp_path_factory.mktemp("gt") / "tiny_sd"))


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return save_tiny_sdxl_pipeline(str(tmp_path_factory.mktemp("gt") / "tiny_sdxl"))


def _inputs(teacher, n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *teacher.latent_shape), generator=gen)
    cond = teacher.encode_prompts(["a red cube", "a blue ball", "a cat"][:n], guided=False)
    added = None
    if cond.added_cond_kwargs:
        added = {k: v.float() for k, v in cond.added_cond_kwargs.items()}
    return noise, cond.encoder_hidden_states.float(), added


def test_guidance_embedding_is_the_pipelines():
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    for g in (1.0, 2.0, 4.5, 7.31):
        for cls in (StableDiffusionPipeline, StableDiffusionXLPipeline):
            ref = cls.get_guidance_scale_embedding(None, torch.tensor(g - 1).repeat(2),
                                                   embedding_dim=256)
            got = guidance_embedding(torch.tensor([g, g], dtype=torch.float32), 256)
            assert torch.equal(got, ref), (cls.__name__, g)
    assert middle_guidance(SET) == 4.5 and middle_guidance({"range": [1.5, 9.0]}) == 5.25
    assert middle_guidance(None) is None


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_conditioned_g_starts_as_the_unconditioned_g(kind, sd_folder, sdxl_folder):
    teacher = Teacher.from_pretrained(sd_folder if kind == "sd" else sdxl_folder)
    plain = make_generator(teacher)
    cond = make_generator(teacher, guidance_set=SET)
    unet = cond.net
    assert unet.config.time_cond_proj_dim == 256 and teacher.denoiser.config.get(
        "time_cond_proj_dim") is None, "the teacher's own network must stay unconditioned"
    assert torch.count_nonzero(unet.time_embedding.cond_proj.weight) == 0
    assert unet.time_embedding.cond_proj.weight.requires_grad
    assert cond.describe()["guidance_set"] == SET and "guidance_set" not in plain.describe()
    noise, ehs, added = _inputs(teacher)
    with torch.no_grad():
        ref = plain(noise, ehs, added)
        g = torch.tensor([2.0, 8.0, 4.5])
        out = cond(noise, ehs, {**(added or {}), "guidance": g})
        default = cond(noise, ehs, added)
    assert torch.equal(out, ref) and torch.equal(default, ref)
    # A few optimiser steps on the new input: different scales now give different outputs.
    opt = torch.optim.Adam([unet.time_embedding.cond_proj.weight], lr=1e-2)
    for _ in range(3):
        x = cond(noise, ehs, {**(added or {}), "guidance": g})
        loss = (x - torch.arange(3.0).view(3, 1, 1, 1)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        same = {**(added or {}), "guidance": torch.full((3,), 2.0)}
        other = {**(added or {}), "guidance": torch.full((3,), 8.0)}
        a, b = cond(noise, ehs, same), cond(noise, ehs, other)
    assert (a - b).abs().max() > 1e-4


def test_sd3_refuses_a_guidance_conditioned_student(tmp_path):
    from d2g_fast.testing.tiny import save_tiny_sd3_pipeline

    teacher = Teacher.from_pretrained(save_tiny_sd3_pipeline(str(tmp_path / "sd3")))
    with pytest.raises(ValueError, match="--pairs.*single --guidance"):
        make_generator(teacher, guidance_set=SET)


# ------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def multi_world(tmp_path_factory, sd_folder):
    from d2g_fast.data import load_prompts
    from d2g_fast.teacher import collect

    root = tmp_path_factory.mktemp("guidance_world")
    with one_thread():
        collect(Teacher.from_pretrained(sd_folder), load_prompts(None), str(root / "pairs"), 24,
                steps=3, guidance=[1.5, 5.0, 9.0], batch_size=8, shard_size=12, seed=1,
                progress=False, log=lambda *a: None)
    return sd_folder, str(root / "pairs")


def test_distill_on_a_multi_guidance_store_is_conditioned_and_resumes_exactly(multi_world,
                                                                             tmp_path):
    from safetensors.torch import load_file
    from test_train import (_config, _distill_cmd, _env, _rows, _state_equal,
                            _without_timings)

    from d2g_fast.train import train

    ref = _config(multi_world, tmp_path / "ref", max_steps=6, r1_interval=2)
    train(ref, log=lambda *a: None)
    last = os.path.join(ref.out, "checkpoints", "step-0000006")
    g, d = (load_file(os.path.join(last, f"{n}.safetensors")) for n in ("generator",
                                                                         "discriminator"))
    g_key = [k for k in g if k.endswith("time_embedding.cond_proj.weight")]
    d_key = [k for k in d if k.endswith("time_embedding.cond_proj.weight")]
    assert g_key and d_key, "G and D must both carry a guidance input"
    assert g[g_key[0]].abs().max() > 0 and d[d_key[0]].abs().max() > 0, \
        "the guidance inputs were not trained"
    killed = _config(multi_world, tmp_path / "killed", max_steps=6, r1_interval=2)
    done = sigkill_after_checkpoint(_distill_cmd(killed), _env(), killed.out, step=2)
    assert done and done[-1] < 6, f"the run finished before the kill ({done})"
    train(killed, log=lambda *a: None)
    assert _without_timings(_rows(killed.out)) == _without_timings(_rows(ref.out))
    assert _state_equal(ref.out, killed.out)


def test_two_processes_match_one_on_a_multi_guidance_store(multi_world, tmp_path):
    """A guidance-conditioned G and D on 2 processes x 1 micro-batch == 1 process x 2 (gloo;
    each rank's pairs carry their own scales), replicated; with D2G_TEST_GUIDANCE_SLOW=1 also
    sharded (FSDP2), resumed once."""
    import dataclasses
    import subprocess

    from safetensors.torch import load_file
    from test_train import _assert_same_metrics, _config, _distill_cmd, _env, _rows, _torchrun

    one = _config(multi_world, tmp_path / "one", max_steps=4, batch_size=2, grad_accum=2)
    proc = subprocess.run(_distill_cmd(one), env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [_config(multi_world, tmp_path / "two", max_steps=4, batch_size=2)]
    _torchrun(runs[0], 29557)
    if SLOW:
        sharded = _config(multi_world, tmp_path / "fsdp", max_steps=2, batch_size=2, fsdp=True)
        _torchrun(sharded, 29558)
        runs.append(dataclasses.replace(sharded, max_steps=4))
        _torchrun(runs[-1], 29559)  # resumes from step 2
    step4 = os.path.join("checkpoints", "step-0000004")
    for two in runs:
        _assert_same_metrics(_rows(one.out), _rows(two.out), rel=1e-4)
        apart, moved = weights_apart(multi_world[0], one.out, two.out)
        assert moved > 0 and apart < 0.01 * moved, (two.out, apart, moved)
        for net in ("generator", "discriminator"):  # the guidance inputs trained alike
            a, b = (load_file(os.path.join(run, step4, f"{net}.safetensors"))
                    for run in (one.out, two.out))
            key = next(k for k in a if k.endswith("time_embedding.cond_proj.weight"))
            assert a[key].abs().max() > 0, (net, "the guidance input was not trained")
            assert (a[key] - b[key]).norm() < 0.01 * a[key].norm(), (two.out, net)


# ------------------------------------------------------------------------------ export and use
def _assert_stock_pipeline_is_g(config, out: str, scales, prompt: str = "a red cube") -> dict:
    """The exported stock pipeline ``out`` at each guidance scale runs the student's network once,
    on a batch of one, with the guidance input given (UNets: ``timestep_cond``; FLUX-dev:
    ``guidance``), and returns the EMA G of the run ``config`` at that scale (rel 1e-5); the
    lowest and highest scales give different latents. Returns {scale: latents}."""
    from diffusers import DiffusionPipeline

    from d2g_fast.teacher.families.flux import unpack
    from d2g_fast.train.build import build_run
    from d2g_fast.train.checkpoint import latest_checkpoint, load_checkpoint

    pipe = DiffusionPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    is_unet = "unet" in pipe.components
    net = pipe.unet if is_unet else pipe.transformer
    if is_unet:
        assert net.config.time_cond_proj_dim == 256
    calls = []
    forward = net.forward

    def counting(*args, **kw):
        x = args[0] if args else kw["sample" if is_unet else "hidden_states"]
        calls.append((x.shape[0], kw.get("timestep_cond" if is_unet else "guidance") is not None))
        return forward(*args, **kw)

    net.forward = counting
    run = build_run(config)
    load_checkpoint(run, latest_checkpoint(config.out))
    teacher = run.teacher
    noise = torch.randn(1, *teacher.latent_shape, generator=torch.Generator().manual_seed(7))
    images = {}
    for g in scales:
        calls.clear()
        with torch.no_grad():
            cond = teacher.encode_prompts([prompt], guided=False)
            added = {**(cond.added_cond_kwargs or {}), "guidance": torch.tensor([g])}
            expected = run.ema(noise, cond.encoder_hidden_states, added)
            got = pipe(prompt, latents=teacher.pipeline_latents(noise.clone()),
                       num_inference_steps=1, guidance_scale=g, height=teacher.height,
                       width=teacher.width, output_type="latent").images
        if got.ndim == 3:  # FLUX's packed tokens
            got = unpack(got, *noise.shape[-2:])
        assert calls == [(1, True)], f"g={g}: one network call on a batch of one with the " \
                                     f"guidance input, got {calls}"
        rel = float((got - expected).abs().max() / expected.abs().max())
        assert rel <= 1e-5, (g, rel)
        images[g] = got
    low, high = min(scales), max(scales)
    assert (images[low] - images[high]).abs().max() > 1e-4, "the scales give the same image"
    return images


def _assert_sample_takes_the_trained_scales_only(student, prompt, inside, outside, trained,
                                                 tmp_path, capsys):
    """d2g sample --guidance ``inside`` writes a PNG of ``prompt``; ``outside`` the student's
    trained set (``trained``, its range as the error names it) is refused by name and writes
    nothing."""
    from d2g_fast.cli import main as d2g_main

    assert d2g_main(["sample", "--model", student, "--prompts", prompt, "--guidance",
                     str(inside), "--out", str(tmp_path / "png")]) == 0
    assert sorted(os.listdir(tmp_path / "png")) == ["00000.png", "prompts.json"]
    capsys.readouterr()
    assert d2g_main(["sample", "--model", student, "--prompts", prompt, "--guidance",
                     str(outside), "--out", str(tmp_path / "png2")]) == 2
    err = capsys.readouterr().err
    assert "--guidance" in err and trained in err, err
    assert not os.path.exists(tmp_path / "png2")


def test_export_is_a_stock_guidance_conditioned_pipeline(multi_world, tmp_path, capsys):
    from test_train import _config

    from d2g_fast.cli import main as d2g_main
    from d2g_fast.train import train

    config = _config(multi_world, tmp_path / "run", max_steps=4, ema_decay=0.5, lr_g=3e-3)
    train(config, log=lambda *a: None)
    out = str(tmp_path / "student")
    assert d2g_main(["export", config.out, "--out", out]) == 0
    info = json.load(open(os.path.join(out, "d2g_student.json")))
    assert info["guidance_set"] == {"values": [1.5, 5.0, 9.0]} and info["guidance_scale"] == 5.0
    _assert_stock_pipeline_is_g(config, out, (1.5, 7.0, 9.0))
    _assert_sample_takes_the_trained_scales_only(out, "a red cube", 8, 12, "[1.5, 9]",
                                                  tmp_path, capsys)
    # d2g eval of the student in one step: the same check, before anything is read or written.
    captions = tmp_path / "c.txt"
    captions.write_text("a red cube\n" * 30000)
    assert d2g_main(["eval", "--model", out, "--steps", "1", "--guidance", "0.5",
                     "--captions", str(captions), "--reference", str(captions),
                     "--inception-weights", str(captions), "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert "--guidance" in err and "[1.5, 9]" in err, err
    assert not os.path.exists(tmp_path / "ev")


def test_lora_student_on_a_multi_guidance_store(multi_world, tmp_path, capsys):
    """A LoRA student on a multi-guidance store trains (and checkpoints) the adapters and G's
    guidance input only; its merged export is the stock guidance-conditioned pipeline == G at
    each scale; a diffusers LoRA file (--lora) cannot carry the guidance input: refused by
    name, nothing written."""
    from safetensors.torch import load_file
    from test_train import _config

    from d2g_fast.cli import main as d2g_main
    from d2g_fast.train import train
    from d2g_fast.train.checkpoint import latest_checkpoint

    config = _config(multi_world, tmp_path / "run", max_steps=4, ema_decay=0.5, lr_g=3e-3,
                     lora_rank=4, lora_alpha=8.0)
    train(config, log=lambda *a: None)
    saved = load_file(os.path.join(latest_checkpoint(config.out), "generator.safetensors"))
    adapters = {k for k in saved if ".lora_A." in k or ".lora_B." in k}
    assert adapters and set(saved) - adapters == {"time_embedding.cond_proj.weight"}
    assert saved["time_embedding.cond_proj.weight"].abs().max() > 0, "guidance input not trained"
    out = str(tmp_path / "student")
    assert d2g_main(["export", config.out, "--out", out]) == 0
    _assert_stock_pipeline_is_g(config, out, (1.5, 7.0, 9.0))
    capsys.readouterr()
    assert d2g_main(["export", config.out, "--out", str(tmp_path / "lora"), "--lora"]) == 2
    assert "--lora" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "lora")


def test_sdxl_export_is_a_stock_guidance_conditioned_pipeline(sdxl_folder, tmp_path):
    """A guidance-conditioned SDXL student: the stock StableDiffusionXLPipeline turns the scale
    into timestep_cond (one UNet call on a batch of one) and gives G at each scale."""
    from test_train import _config

    from d2g_fast.cli import main as d2g_main
    from d2g_fast.data import load_prompts
    from d2g_fast.teacher import collect
    from d2g_fast.train import train

    pairs = str(tmp_path / "pairs")
    collect(Teacher.from_pretrained(sdxl_folder), load_prompts(None), pairs, 16, steps=3,
            guidance=[1.5, 5.0, 9.0], batch_size=8, shard_size=8, seed=1, progress=False,
            log=lambda *a: None)
    config = _config((sdxl_folder, pairs), tmp_path / "run", max_steps=4, ema_decay=0.5,
                     lr_g=3e-3)
    train(config, log=lambda *a: None)
    out = str(tmp_path / "student")
    assert d2g_main(["export", config.out, "--out", out]) == 0
    info = json.load(open(os.path.join(out, "d2g_student.json")))
    assert info["pipeline_class"] == "StableDiffusionXLPipeline"
    assert info["guidance_set"] == {"values": [1.5, 5.0, 9.0]} and info["guidance_scale"] == 5.0
    _assert_stock_pipeline_is_g(config, out, (1.5, 4.0, 9.0))


def test_flux_dev_student_end_to_end_on_a_multi_guidance_store(tmp_path, capsys):
    """d2g collect --guidance 2,4.5,8 -> distill -> export -> sample --guidance on a tiny
    FLUX-dev teacher (its own guidance embedding conditions G): the exported stock FluxPipeline
    at each scale is G at that scale, and d2g sample --guidance writes PNGs."""
    from d2g_fast.cli import main as d2g_main
    from d2g_fast.data import PairDataset
    from d2g_fast.testing.tiny import save_tiny_flux_pipeline
    from d2g_fast.train import TrainConfig

    folder = save_tiny_flux_pipeline(str(tmp_path / "flux"))
    pairs, run_dir, out = (str(tmp_path / n) for n in ("pairs", "run", "student"))
    assert d2g_main(["collect", "--teacher", folder, "--num-pairs", "8", "--steps", "2",
                     "--resolution", "16", "--batch-size", "4", "--shard-size", "4",
                     "--guidance", "2,4.5,8", "--seed", "1", "--no-progress",
                     "--out", pairs]) == 0
    store = PairDataset(pairs)
    assert store.guidance_set == {"values": [2.0, 4.5, 8.0]}
    assert len({float(store[i]["guidance"]) for i in range(8)}) > 1
    assert d2g_main(["distill", "--teacher", folder, "--pairs", pairs, "--out", run_dir,
                     "--lpips-random", "--batch-size", "2", "--max-steps", "4",
                     "--checkpoint-every", "2", "--lr-g", "1e-3", "--ema-decay", "0.5",
                     "--no-progress"]) == 0
    assert d2g_main(["export", run_dir, "--out", out]) == 0
    info = json.load(open(os.path.join(out, "d2g_student.json")))
    assert info["pipeline_class"] == "FluxPipeline"
    assert info["guidance_set"] == {"values": [2.0, 4.5, 8.0]} and info["guidance_scale"] == 4.5
    config = TrainConfig(teacher=folder, pairs=pairs, out=run_dir, lpips_random=True,
                         batch_size=2, ema_decay=0.5)
    _assert_stock_pipeline_is_g(config, out, (2.0, 3.0, 8.0), prompt="a red fox")
    _assert_sample_takes_the_trained_scales_only(out, "a red fox", 3, 12, "[2, 8]", tmp_path,
                                                  capsys)


def test_a_fixed_guidance_student_refuses_another_guidance():
    from d2g_fast.train.sample_cmd import check_student_guidance, student_call_arguments

    sd = {"guidance_scale": 1.0, "guidance_set": None}
    assert student_call_arguments(sd) == {"guidance_scale": 1.0}
    assert check_student_guidance(sd, 0.0) == 0.0  # no CFG either way
    with pytest.raises(ValueError, match="--guidance.*fixed.*guidance_scale=1 only"):
        check_student_guidance(sd, 4.5)
    flux_dev = {"guidance_scale": 3.5}
    assert student_call_arguments(flux_dev, 3.5)["guidance_scale"] == 3.5
    with pytest.raises(ValueError, match="--guidance.*guidance_scale=3.5 only"):
        student_call_arguments(flux_dev, 5.0)
    ranged = {"guidance_scale": 5.25, "guidance_set": {"range": [1.5, 9.0]}}
    assert student_call_arguments(ranged, 2.0)["guidance_scale"] == 2.0
    with pytest.raises(ValueError, match="--guidance.*1.5, 9"):
        student_call_arguments(ranged, 1.0)


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_flux_dev_embeds_each_rows_guidance_and_schnell_refuses(guidance_embeds, tmp_path):
    from d2g_fast.testing.tiny import save_tiny_flux_pipeline

    folder = save_tiny_flux_pipeline(str(tmp_path / "flux"), guidance_embeds=guidance_embeds)
    teacher = Teacher.from_pretrained(folder)
    if not guidance_embeds:
        with pytest.raises(ValueError, match="--pairs.*single --guidance"):
            make_generator(teacher, guidance_set={"values": [2.0, 6.0]})
        return
    cond_g = make_generator(teacher, guidance_set={"values": [2.0, 6.0]})
    assert cond_g.guidance_conditioned and cond_g.default_guidance == 2.0
    noise, ehs, added = _inputs(teacher, n=2)
    with torch.no_grad():
        out = cond_g(noise, ehs, {**added, "guidance": torch.tensor([2.0, 6.0])})
        low = make_generator(teacher, guidance=2.0)(noise, ehs, added)
        high = make_generator(teacher, guidance=6.0)(noise, ehs, added)
    # Each row is the fixed-guidance G at that row's scale: FLUX-dev's own embedding takes it.
    assert torch.allclose(out[0], low[0], rtol=0, atol=1e-6)
    assert torch.allclose(out[1], high[1], rtol=0, atol=1e-6)
    assert (low[1] - high[1]).abs().max() > 1e-5
