"""The distillation trainer end to end on tiny SD-shaped teachers: it learns (epsilon and
v-prediction), resumes exactly after SIGKILL (between steps and while writing a checkpoint),
gives the same numbers on 2 processes as on 1, exports a one-step diffusers pipeline that
reproduces G, and refuses bad input before training."""
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from d2g_helpers import assert_resume_after_sigkill_while_writing_is_exact
from d2g_helpers import checkpoints_equal as _state_equal
from d2g_helpers import metrics_rows as _rows
from d2g_helpers import one_thread, sigkill_after_checkpoint, weights_apart
from d2g_helpers import without_timings as _without_timings

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from d2g_fast.cli import main as d2g_main  # noqa: E402
from d2g_fast.data import load_prompts  # noqa: E402
from d2g_fast.teacher import Teacher, collect  # noqa: E402
from d2g_fast.testing import save_tiny_sd_pipeline  # noqa: E402
from d2g_fast.train import TrainConfig, train  # noqa: E402
from d2g_fast.train.log import COLUMNS, TIMING_COLUMNS  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _one_thread_train():
    with one_thread():
        yield


def _world(root, prediction_type="epsilon", pairs=40, seed=0):
    teacher_dir = save_tiny_sd_pipeline(os.path.join(root, "teacher"), seed=seed,
                                        prediction_type=prediction_type)
    teacher = Teacher.from_pretrained(teacher_dir)
    collect(teacher, load_prompts(None), os.path.join(root, "pairs"), pairs, steps=4,
            guidance=3.0, batch_size=8, shard_size=16, progress=False, log=lambda *a: None)
    return teacher_dir, os.path.join(root, "pairs")


@pytest.fixture(scope="module")
def eps_world(tmp_path_factory):
    with one_thread():
        return _world(str(tmp_path_factory.mktemp("train_eps")))


@pytest.fixture(scope="module")
def v_world(tmp_path_factory):
    with one_thread():
        return _world(str(tmp_path_factory.mktemp("train_v")), "v_prediction")


def _config(world, out, **kw):
    teacher, pairs = world
    base = dict(teacher=teacher, pairs=pairs, out=str(out), lpips_random=True, batch_size=4,
                max_steps=6, log_every=1, checkpoint_every=2, lr_g=3e-4, lr_d=1e-4,
                lambda_gan=0.1, r1_interval=2, progress=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def _cli_args(config: TrainConfig) -> list[str]:
    args = []
    for key, value in config.to_dict().items():
        default = getattr(TrainConfig(), key)
        if key == "progress":
            if not value:
                args.append("--no-progress")
            continue
        if value == default or value in (None, [], ""):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag)
        elif isinstance(value, (list, tuple)):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    return args


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, HF_HUB_OFFLINE="1")
    env.update(extra)
    return env


def _distill_cmd(config):
    return [sys.executable, "-m", "d2g_fast.cli", "distill", *_cli_args(config)]


# ------------------------------------------------------------------------------ learning
@pytest.mark.parametrize("world_name", ["eps_world", "v_world"])
def test_training_lowers_heldout_elatentlpips(world_name, request, tmp_path):
    world = request.getfixturevalue(world_name)
    config = _config(world, tmp_path / "run", max_steps=24, log_every=4, checkpoint_every=24,
                     val_pairs=8, batch_size=8, ema_decay=0.0)
    train(config, log=lambda *a: None)
    rows = _rows(config.out)
    val = [float(r["val_e_latentlpips"]) for r in rows]
    assert len(val) == 6
    # Held-out pairs are never trained on; the loss is E-LatentLPIPS with a random trunk.
    assert val[-1] < 0.8 * val[0], val
    assert all(math.isfinite(float(r["e_latentlpips"])) for r in rows)
    assert json.load(open(os.path.join(config.out, "config.json")))["max_steps"] == 24


# ------------------------------------------------------------------------------ resume
def test_resume_after_sigkill_between_steps_is_exact(eps_world, tmp_path):
    ref = _config(eps_world, tmp_path / "ref", max_steps=8)
    train(ref, log=lambda *a: None)
    killed = _config(eps_world, tmp_path / "killed", max_steps=8)
    done = sigkill_after_checkpoint(_distill_cmd(killed), _env(), killed.out, step=2)
    assert done and done[-1] < 8, f"the run finished before the kill ({done})"
    train(killed, log=lambda *a: None)  # --resume auto
    assert _without_timings(_rows(killed.out)) == _without_timings(_rows(ref.out))
    assert _state_equal(ref.out, killed.out)


def test_resume_after_sigkill_while_writing_a_checkpoint_is_exact(eps_world, tmp_path):
    assert_resume_after_sigkill_while_writing_is_exact(
        lambda name: _config(eps_world, tmp_path / name, max_steps=6), _distill_cmd, _env)


def test_resume_refuses_a_changed_recipe(eps_world, tmp_path):
    config = _config(eps_world, tmp_path / "run", max_steps=2)
    train(config, log=lambda *a: None)
    with pytest.raises(ValueError, match="seed"):
        train(_config(eps_world, tmp_path / "run", max_steps=4, seed=4), log=lambda *a: None)
    with pytest.raises(ValueError, match="batch"):
        train(_config(eps_world, tmp_path / "run", max_steps=4, grad_accum=2),
              log=lambda *a: None)
    with pytest.raises(ValueError, match="--resume"):
        train(_config(eps_world, tmp_path / "run", max_steps=4, resume="none"),
              log=lambda *a: None)


# ------------------------------------------------------------------------------ processes
def _torchrun(config, port):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(port), "-m", "d2g_fast.cli", "distill", *_cli_args(config)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _assert_same_metrics(rows_one, rows_two, rel):
    assert len(rows_one) == len(rows_two) == 4
    for r1, r2 in zip(rows_one, rows_two):
        for key in COLUMNS:
            if key in TIMING_COLUMNS:
                continue
            if key == "step" or r1[key] == "":
                assert r1[key] == r2[key], key
                continue
            assert float(r1[key]) == pytest.approx(float(r2[key]), rel=rel, abs=1e-6), key


def test_two_processes_match_one_at_the_same_global_batch(eps_world, tmp_path):
    """1 process x 2 micro-batches == 2 processes x 1, replicated (gloo all-reduce) and sharded
    (FSDP2, resumed once from its checkpoint)."""
    one = _config(eps_world, tmp_path / "one", max_steps=4, batch_size=2, grad_accum=2)
    proc = subprocess.run(_distill_cmd(one), env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = _config(eps_world, tmp_path / "two", max_steps=4, batch_size=2)
    _torchrun(two, 29517)
    _assert_same_metrics(_rows(one.out), _rows(two.out), rel=1e-4)
    apart, moved = weights_apart(eps_world[0], one.out, two.out)
    assert moved > 0 and apart < 0.01 * moved, (apart, moved)

    sharded = _config(eps_world, tmp_path / "fsdp", max_steps=2, batch_size=2, fsdp=True)
    _torchrun(sharded, 29518)
    _torchrun(dataclasses.replace(sharded, max_steps=4), 29519)  # resumes from step 2
    _assert_same_metrics(_rows(one.out), _rows(sharded.out), rel=1e-4)
    apart, moved = weights_apart(eps_world[0], one.out, sharded.out)
    assert moved > 0 and apart < 0.01 * moved, (apart, moved)


# ------------------------------------------------------------------------------ export
def test_export_reproduces_the_generator(v_world, tmp_path):
    from diffusers import DiffusionPipeline

    from d2g_fast.train.build import build_run
    from d2g_fast.train.checkpoint import latest_checkpoint, load_checkpoint

    config = _config(v_world, tmp_path / "run", max_steps=2, ema_decay=0.5, sample_every=2,
                     sample_prompts=["a red cube", "a blue sphere"])
    train(config, log=lambda *a: None)
    from PIL import Image

    grid = Image.open(os.path.join(config.out, "samples", "step-0000002.png"))
    assert grid.size == (2 * 16, 16)  # two 16x16 decoded samples side by side
    out = tmp_path / "student"
    assert d2g_main(["export", config.out, "--out", str(out)]) == 0
    pipe = DiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    run = build_run(config)
    load_checkpoint(run, latest_checkpoint(config.out))
    prompts = ["a red cube", "a blue sphere"]
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        cond = run.teacher.encode_prompts(prompts, guided=False)
        expected = run.ema(noise, cond.encoder_hidden_states)
        got = pipe(prompts, latents=noise.clone(), num_inference_steps=1, guidance_scale=1.0,
                   output_type="latent").images
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()
    # and d2g sample writes pictures from it
    assert d2g_main(["sample", "--model", str(out), "--prompts", "a red cube", "--num", "2",
                     "--out", str(tmp_path / "png")]) == 0
    assert sorted(os.listdir(tmp_path / "png")) == ["00000.png", "00001.png", "prompts.json"]


# ------------------------------------------------------------------------------ bad input
def _distill(argv, capsys):
    rc = d2g_main(["distill", *argv])
    return rc, capsys.readouterr().err


def test_bad_input_is_refused_before_training(eps_world, tmp_path, capsys):
    teacher, pairs = eps_world
    base = ["--teacher", teacher, "--pairs", pairs, "--out", str(tmp_path / "r"),
            "--lpips-random", "--no-progress", "--max-steps", "1"]
    no_unet = tmp_path / "no_unet"
    shutil.copytree(teacher, no_unet)
    shutil.rmtree(no_unet / "unet")
    rc, err = _distill(["--teacher", str(no_unet), *base[2:]], capsys)
    assert rc == 2 and "--teacher" in err and "UNet" in err
    rc, err = _distill([*base, "--batch-size", "64"], capsys)
    assert rc == 2 and "--batch-size" in err and "40" in err
    rc, err = _distill([*base[:2], "--pairs", str(tmp_path), *base[4:]], capsys)
    assert rc == 2 and "--pairs" in err
    other = tmp_path / "other"
    other_teacher, other_pairs = _world(str(other), pairs=8, seed=1)
    rc, err = _distill(["--teacher", teacher, "--pairs", other_pairs, *base[4:]], capsys)
    assert rc == 2 and "--pairs" in err and "another teacher" in err
    incomplete = tmp_path / "incomplete"
    shutil.copytree(pairs, incomplete)
    manifest = json.load(open(incomplete / "manifest.json"))
    manifest["complete"] = False
    json.dump(manifest, open(incomplete / "manifest.json", "w"))
    rc, err = _distill([*base[:2], "--pairs", str(incomplete), *base[4:]], capsys)
    assert rc == 2 and "--pairs" in err and "incomplete" in err
    rc, err = _distill([*base, "--lr-g", "-1"], capsys)
    assert rc == 2 and "--lr-g" in err
    rc, err = _distill([*base, "--d-taps", "0"], capsys)  # a transformer D's option
    assert rc == 2 and "--d-taps" in err and "DiffusionDiscriminator" in err
    no_loss = [a for a in base if a != "--lpips-random"]
    rc, err = _distill(no_loss, capsys)
    assert rc == 2 and "--lpips-dir" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr_g: 1e-4\nnot_a_setting: 3\n")
    rc, err = _distill([*base, "--config", str(bad)], capsys)
    assert rc == 2 and "not_a_setting" in err
    assert not os.path.exists(tmp_path / "r" / "metrics.csv")


def test_config_file_then_flags(eps_world, tmp_path):
    from d2g_fast.train.distill_cmd import add_arguments, config_from_args
    import argparse

    teacher, pairs = eps_world
    for name, text in (("c.yaml", "lr_g: 2.0e-4\nbatch-size: 3\nbetas_g: [0.5, 0.9]\n"),
                       ("c.toml", "lr_g = 2.0e-4\nbatch_size = 3\nbetas_g = [0.5, 0.9]\n"),
                       ("c.json", '{"lr_g": 2e-4, "batch_size": 3, "betas_g": [0.5, 0.9]}')):
        path = tmp_path / name
        path.write_text(text)
        p = argparse.ArgumentParser()
        add_arguments(p)
        args = p.parse_args(["--config", str(path), "--teacher", teacher, "--pairs", pairs,
                             "--out", "x", "--batch-size", "5"])
        config = config_from_args(args)
        assert (config.lr_g, config.batch_size, config.betas_g) == (2e-4, 5, (0.5, 0.9)), name


def test_nonfinite_losses_are_skipped_then_abort(eps_world, tmp_path, monkeypatch):
    from d2g_fast.nn.elatentlpips import ELatentLPIPS

    real_forward = ELatentLPIPS.forward
    calls = {"n": 0}

    def flaky(self, *a, **k):
        calls["n"] += 1
        out = real_forward(self, *a, **k)
        return out * float("nan") if calls["n"] == 2 else out

    monkeypatch.setattr(ELatentLPIPS, "forward", flaky)
    config = _config(eps_world, tmp_path / "run", max_steps=3, checkpoint_every=3)
    train(config, log=lambda *a: None)
    rows = _rows(config.out)
    assert [r["nonfinite_skipped"] for r in rows] == ["0", "1", "1"]
    assert rows[1]["grad_norm_g"] == "nan"

    monkeypatch.setattr(ELatentLPIPS, "forward",
                        lambda self, *a, **k: real_forward(self, *a, **k) * float("nan"))
    config = _config(eps_world, tmp_path / "run2", max_steps=10, max_nonfinite=3)
    with pytest.raises(FloatingPointError, match="--max-nonfinite"):
        train(config, log=lambda *a: None)


# ------------------------------------------------------------------------------ variants
def test_checkpointing_and_stored_embeddings_change_nothing(eps_world, tmp_path):
    """Gradient checkpointing recomputes the same numbers; a store holding the prompt
    embeddings trains exactly as one whose prompts are encoded per batch."""
    teacher_dir, _ = eps_world
    teacher = Teacher.from_pretrained(teacher_dir)
    stored = str(tmp_path / "pairs_emb")
    collect(teacher, load_prompts(None), stored, 40, steps=4, guidance=3.0, batch_size=8,
            shard_size=16, progress=False, store_embeddings=True, log=lambda *a: None)
    plain = _config(eps_world, tmp_path / "plain", max_steps=2)
    train(plain, log=lambda *a: None)
    variant = _config((teacher_dir, stored), tmp_path / "variant", max_steps=2,
                      gradient_checkpointing=True)
    train(variant, log=lambda *a: None)
    assert _without_timings(_rows(variant.out)) == _without_timings(_rows(plain.out))


def test_bf16_runs(eps_world, tmp_path):
    config = _config(eps_world, tmp_path / "bf16", max_steps=2, precision="bf16")
    lines = []
    train(config, log=lines.append)
    rows = _rows(config.out)
    assert all(math.isfinite(float(r["e_latentlpips"])) for r in rows)
    # The CPU's bf16 hardware is detected and reported at start (issue 23).
    from d2g_fast.cpu_features import describe
    assert any(describe() in line and "--precision bf16" in line for line in lines), lines


def test_sdxl_teacher_trains_and_exports(tmp_path):
    from diffusers import DiffusionPipeline

    from d2g_fast.testing import save_tiny_sdxl_pipeline
    from d2g_fast.train.build import build_run
    from d2g_fast.train.checkpoint import latest_checkpoint, load_checkpoint

    teacher_dir = save_tiny_sdxl_pipeline(str(tmp_path / "sdxl"))
    teacher = Teacher.from_pretrained(teacher_dir)
    pairs = str(tmp_path / "pairs")
    collect(teacher, load_prompts(None), pairs, 16, steps=3, guidance=3.0, batch_size=8,
            shard_size=16, progress=False, store_embeddings=True, log=lambda *a: None)
    config = _config((teacher_dir, pairs), tmp_path / "run", max_steps=2, ema_decay=0.0)
    train(config, log=lambda *a: None)
    out = tmp_path / "student"
    assert d2g_main(["export", config.out, "--out", str(out)]) == 0
    pipe = DiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    run = build_run(config)
    load_checkpoint(run, latest_checkpoint(config.out))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    prompts = ["a red cube", "a blue sphere"]
    with torch.no_grad():
        cond = run.teacher.encode_prompts(prompts, guided=False)
        expected = run.generator(noise, cond.encoder_hidden_states, cond.added_cond_kwargs)
        got = pipe(prompts, latents=noise.clone(), num_inference_steps=1, guidance_scale=1.0,
                   output_type="latent").images
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()
