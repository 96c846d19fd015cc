"""A guidance-conditioned one-step student (issue 21, part 2): G's and D's zero-initialised
guidance inputs, G at initialisation equal to the unconditioned G (the teacher's one-step
prediction), and the guidance embedding the stock pipeline computes."""
import json
import os

import pytest
import torch
from d2g_helpers import one_thread

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from d2g_fast.teacher import Teacher  # noqa: E402
from d2g_fast.teacher.families.sd import guidance_embedding  # noqa: E402
from d2g_fast.testing import save_tiny_sd_pipeline, save_tiny_sdxl_pipeline  # noqa: E402
from d2g_fast.train.generator import make_generator, middle_guidance  # noqa: E402

SET = {"values": [2.0, 4.5, 8.0]}


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
    import signal
    import subprocess
    import time

    from safetensors.torch import load_file
    from test_train import (_config, _distill_cmd, _env, _rows, _state_equal,
                            _without_timings)

    from d2g_fast.train import train
    from d2g_fast.train.checkpoint import list_checkpoints

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
    proc = subprocess.Popen(_distill_cmd(killed), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    marker = os.path.join(killed.out, "checkpoints", "step-0000002", "complete.json")
    deadline = time.time() + 120
    while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [s for s, _ in list_checkpoints(killed.out)]
    assert done and done[-1] < 6, f"the run finished before the kill ({done})"
    train(killed, log=lambda *a: None)
    assert _without_timings(_rows(killed.out)) == _without_timings(_rows(ref.out))
    assert _state_equal(ref.out, killed.out)


# ------------------------------------------------------------------------------ export and use
def test_export_is_a_stock_guidance_conditioned_pipeline(multi_world, tmp_path, capsys):
    from diffusers import DiffusionPipeline
    from test_train import _config

    from d2g_fast.cli import main as d2g_main
    from d2g_fast.train import train
    from d2g_fast.train.build import build_run
    from d2g_fast.train.checkpoint import latest_checkpoint, load_checkpoint

    config = _config(multi_world, tmp_path / "run", max_steps=4, ema_decay=0.5, lr_g=3e-3)
    train(config, log=lambda *a: None)
    out = str(tmp_path / "student")
    assert d2g_main(["export", config.out, "--out", out]) == 0
    info = json.load(open(os.path.join(out, "d2g_student.json")))
    assert info["guidance_set"] == {"values": [1.5, 5.0, 9.0]} and info["guidance_scale"] == 5.0
    pipe = DiffusionPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.time_cond_proj_dim == 256
    calls = []
    forward = pipe.unet.forward

    def counting(sample, timestep, *a, **kw):
        calls.append((sample.shape[0], kw.get("timestep_cond") is not None))
        return forward(sample, timestep, *a, **kw)

    pipe.unet.forward = counting
    run = build_run(config)
    load_checkpoint(run, latest_checkpoint(config.out))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    images = {}
    for g in (1.5, 7.0, 9.0):
        calls.clear()
        with torch.no_grad():
            cond = run.teacher.encode_prompts(["a red cube"], guided=False)
            expected = run.ema(noise, cond.encoder_hidden_states,
                               {"guidance": torch.tensor([g])})
            got = pipe("a red cube", latents=noise.clone(), num_inference_steps=1,
                       guidance_scale=g, output_type="latent").images
        assert calls == [(1, True)], f"g={g}: one UNet call on a batch of one with timestep_cond"
        rel = float((got - expected).abs().max() / expected.abs().max())
        assert rel <= 1e-5, (g, rel)
        images[g] = got
    assert (images[1.5] - images[9.0]).abs().max() > 1e-4, "the scales give the same image"
    # d2g sample --guidance writes PNGs; a scale outside the trained set is refused by name.
    assert d2g_main(["sample", "--model", out, "--prompts", "a red cube", "--guidance", "8",
                     "--out", str(tmp_path / "png")]) == 0
    assert sorted(os.listdir(tmp_path / "png")) == ["00000.png", "prompts.json"]
    capsys.readouterr()
    assert d2g_main(["sample", "--model", out, "--prompts", "a red cube", "--guidance", "12",
                     "--out", str(tmp_path / "png2")]) == 2
    err = capsys.readouterr().err
    assert "--guidance" in err and "[1.5, 9]" in err, err
    assert not os.path.exists(tmp_path / "png2")
    # d2g eval of the student in one step: the same check, before anything is read or written.
    captions = tmp_path / "c.txt"
    captions.write_text("a red cube\n" * 30000)
    assert d2g_main(["eval", "--model", out, "--steps", "1", "--guidance", "0.5",
                     "--captions", str(captions), "--reference", str(captions),
                     "--inception-weights", str(captions), "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert "--guidance" in err and "[1.5, 9]" in err, err
    assert not os.path.exists(tmp_path / "ev")


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
