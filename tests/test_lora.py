"""LoRA students (d2g distill --lora-rank) on a tiny SD teacher: only the adapters train and are
checkpointed (a small fraction of G), the teacher's weights stay as they were, a SIGKILL while
writing a checkpoint resumes to identical numbers, d2g export writes a merged pipeline and a
diffusers LoRA file that the teacher's own pipeline loads, both reproducing G (rel 1e-5; also
on tiny SDXL, SD3 and FLUX-dev teachers), and 2 processes compute what 1 computes (FSDP2
form with D2G_TEST_LORA_SLOW=1)."""
import dataclasses
import json
import os
import subprocess

import pytest
import torch
from d2g_helpers import assert_resume_after_sigkill_while_writing_is_exact, one_thread

pytest.importorskip("peft")
pytest.importorskip("diffusers")

from d2g_fast.cli import main as d2g_main  # noqa: E402
from d2g_fast.train import train  # noqa: E402
from test_train import _config, _distill_cmd, _env, _rows, _world  # noqa: E402

LORA = dict(lora_rank=4, lora_alpha=8.0)


@pytest.fixture(autouse=True)
def _one_thread_lora():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with one_thread():
        return _world(str(tmp_path_factory.mktemp("lora_world")), "v_prediction", pairs=24)


@pytest.fixture(scope="module")
def lora_run(world, tmp_path_factory):
    config = _config(world, tmp_path_factory.mktemp("lora_run") / "run", max_steps=4,
                     ema_decay=0.5, **LORA)
    with one_thread():
        train(config, log=lambda *a: None)
    return config


def _checkpoint(run_dir):
    from d2g_fast.train.checkpoint import latest_checkpoint

    return latest_checkpoint(run_dir)


def test_only_adapters_train_and_are_checkpointed(world, lora_run):
    from safetensors.torch import load_file

    from d2g_fast.teacher import Teacher
    from d2g_fast.train.build import build_run
    from d2g_fast.train.checkpoint import load_checkpoint

    path = _checkpoint(lora_run.out)
    saved = load_file(os.path.join(path, "generator.safetensors"))
    ema = load_file(os.path.join(path, "ema.safetensors"))
    assert saved and set(saved) == set(ema)
    assert all(".lora_A." in k or ".lora_B." in k for k in saved), sorted(saved)[:5]
    teacher = Teacher.from_pretrained(lora_run.teacher)
    full = sum(p.numel() for p in teacher.denoiser.parameters())
    adapters = sum(t.numel() for t in saved.values())
    assert adapters < 0.2 * full, (adapters, full)
    # The adapters moved (B starts at zero), the EMA differs from G, the base is the teacher's.
    assert any(k.endswith("lora_B.default.weight") and t.abs().max() > 0
               for k, t in saved.items())
    assert any(not torch.equal(saved[k], ema[k]) for k in saved)
    run = build_run(lora_run)
    load_checkpoint(run, path)
    trainable = {n for n, p in run.generator.named_parameters() if p.requires_grad}
    assert trainable == {"unet." + k for k in saved}
    base = dict(teacher.denoiser.named_parameters())
    for name, p in run.generator.net.named_parameters():
        plain = name.replace(".base_layer.", ".")
        if not p.requires_grad:
            assert torch.equal(p.detach(), base[plain].detach()), name
    opt_tensors = sum(v.numel() for s in run.opt_g.state.values() for v in s.values()
                      if torch.is_tensor(v) and v.ndim > 0)
    assert opt_tensors == 2 * adapters  # AdamW holds moments of the adapters only


def test_resume_after_sigkill_while_writing_a_checkpoint_is_exact(world, tmp_path):
    assert_resume_after_sigkill_while_writing_is_exact(
        lambda name: _config(world, tmp_path / name, max_steps=6, **LORA), _distill_cmd, _env)


def test_export_merged_pipeline_and_lora_file_reproduce_g(lora_run, tmp_path):
    from diffusers import DDIMScheduler, DiffusionPipeline

    from d2g_fast.train.build import build_run
    from d2g_fast.train.checkpoint import load_checkpoint

    out = tmp_path / "student"
    assert d2g_main(["export", lora_run.out, "--out", str(out), "--lora"]) == 0
    info = json.load(open(out / "d2g_student.json"))
    assert info["lora"]["rank"] == 4 and "load_lora_weights" in info["lora"]["usage"]
    assert os.path.isfile(out / "lora" / "pytorch_lora_weights.safetensors")
    run = build_run(lora_run)
    load_checkpoint(run, _checkpoint(lora_run.out))
    prompts = ["a red cube", "a blue sphere"]
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    merged = DiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    # The teacher's own pipeline, the LoRA file and the one-step scheduler (the documented line).
    stock = DiffusionPipeline.from_pretrained(lora_run.teacher, local_files_only=True)
    stock.load_lora_weights(str(out / "lora"))
    stock.scheduler = DDIMScheduler.from_pretrained(str(out / "lora"), subfolder="scheduler")
    with torch.no_grad():
        cond = run.teacher.encode_prompts(prompts, guided=False)
        expected = run.ema(noise, cond.encoder_hidden_states)
        got = {}
        for name, pipe in (("merged", merged), ("lora file", stock)):
            pipe.set_progress_bar_config(disable=True)
            got[name] = pipe(prompts, latents=noise.clone(), num_inference_steps=1,
                             guidance_scale=1.0, output_type="latent").images
    for name, latents in got.items():
        rel = float((latents - expected).norm() / expected.norm())
        assert rel < 1e-5, (name, rel)
    # the adapters changed the result: the teacher alone gives other latents
    stock.unload_lora_weights()
    with torch.no_grad():
        plain = stock(prompts, latents=noise.clone(), num_inference_steps=1, guidance_scale=1.0,
                      output_type="latent").images
    assert float((plain - expected).norm() / expected.norm()) > 1e-4


def test_bad_lora_input_is_refused(world, lora_run, tmp_path, capsys):
    from d2g_fast.train import TrainConfig

    with pytest.raises(ValueError, match="--lora-targets"):
        TrainConfig(teacher="t", pairs="p", out="o", lora_targets=["to_q"]).validate()
    with pytest.raises(ValueError, match="--lora-rank"):
        TrainConfig(teacher="t", pairs="p", out="o", lora_rank=-1).validate()
    with pytest.raises(ValueError, match="--lora-targets"):
        train(_config(world, tmp_path / "nomatch", max_steps=1, lora_rank=2,
                      lora_targets=["no_such_layer"]), log=lambda *a: None)
    # a full run has no adapters to export; nothing is written
    full = _config(world, tmp_path / "full", max_steps=2)
    train(full, log=lambda *a: None)
    with pytest.raises(ValueError, match="--lora"):
        from d2g_fast.train.export import export_pipeline

        export_pipeline(full.out, str(tmp_path / "nolora"), lora_file=True)
    assert not os.path.exists(tmp_path / "nolora")
    # resuming a LoRA run with another rank (or as a full G) is refused by name
    with pytest.raises(ValueError, match="--lora-rank"):
        train(_config(world, lora_run.out, max_steps=6, lora_rank=8), log=lambda *a: None)


def _tiny_teacher(kind: str, folder: str) -> str:
    from d2g_fast.testing.tiny import (save_tiny_flux_pipeline, save_tiny_sd3_pipeline,
                                       save_tiny_sdxl_pipeline)

    return {"sdxl": save_tiny_sdxl_pipeline, "sd3": save_tiny_sd3_pipeline,
            "flux": save_tiny_flux_pipeline}[kind](folder)


@pytest.mark.parametrize("kind", ["sdxl", "sd3", "flux"])
def test_lora_student_exports_a_lora_file_for_the_teachers_pipeline(kind, tmp_path, capsys):
    """The same code path on the other families (tiny SDXL UNet, SD3 and FLUX-dev
    transformers): only the adapters train and are checkpointed, and the merged export == the
    stock teacher pipeline + load_lora_weights + the one-step scheduler == G (rel 1e-5)."""
    import diffusers
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    from d2g_fast.teacher import Teacher
    from d2g_fast.train import TrainConfig
    from d2g_fast.train.build import build_run
    from d2g_fast.train.checkpoint import load_checkpoint

    folder = _tiny_teacher(kind, str(tmp_path / kind))
    pairs, run_dir, out = (str(tmp_path / n) for n in ("pairs", "run", "student"))
    assert d2g_main(["collect", "--teacher", folder, "--num-pairs", "4", "--steps", "2",
                     "--resolution", "16", "--batch-size", "2", "--shard-size", "2",
                     "--guidance", "3.5", "--no-progress", "--out", pairs]) == 0
    assert d2g_main(["distill", "--teacher", folder, "--pairs", pairs, "--out", run_dir,
                     "--lpips-random", "--batch-size", "2", "--max-steps", "2",
                     "--checkpoint-every", "2", "--lr-g", "1e-3", "--ema-decay", "0.5",
                     "--lora-rank", "2", "--no-progress"]) == 0
    saved = load_file(os.path.join(_checkpoint(run_dir), "generator.safetensors"))
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved), sorted(saved)[:5]
    assert any(k.endswith("lora_B.default.weight") and t.abs().max() > 0
               for k, t in saved.items())  # the adapters moved: G is not the teacher
    full = sum(p.numel() for p in Teacher.from_pretrained(folder).denoiser.parameters())
    assert sum(t.numel() for t in saved.values()) < 0.2 * full
    assert d2g_main(["export", run_dir, "--out", out, "--lora"]) == 0
    capsys.readouterr()
    info = json.load(open(os.path.join(out, "d2g_student.json")))
    config = TrainConfig(teacher=folder, pairs=pairs, out=run_dir, lpips_random=True,
                         batch_size=2, lora_rank=2, ema_decay=0.5)
    run = build_run(config)
    load_checkpoint(run, _checkpoint(run_dir))
    trainable = {n.split(".", 1)[1] for n, p in run.generator.named_parameters()
                 if p.requires_grad}  # G's parameter names are its network's, prefixed
    assert trainable == set(saved)
    noise = torch.randn(2, *run.teacher.latent_shape, generator=torch.Generator().manual_seed(9))
    prompts = ["a red fox", "x"]
    merged = DiffusionPipeline.from_pretrained(out, local_files_only=True)
    stock = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    stock.load_lora_weights(os.path.join(out, "lora"))
    # the documented line: the one-step scheduler saved beside the LoRA file
    scheduler_class = type(merged.scheduler).__name__
    assert f"{scheduler_class}.from_pretrained" in info["lora"]["usage"]
    stock.scheduler = getattr(diffusers, scheduler_class).from_pretrained(
        os.path.join(out, "lora"), subfolder="scheduler")
    with torch.no_grad():
        cond = run.teacher.encode_prompts(prompts, guided=False)
        expected = run.ema(noise, cond.encoder_hidden_states, cond.added_cond_kwargs)
        got = {}
        for name, pipe in (("merged", merged), ("lora file", stock)):
            got[name] = _one_step_latents(run.teacher, pipe, prompts, noise,
                                          info["guidance_scale"])
    for name, latents in got.items():
        rel = float((latents - expected).norm() / expected.norm())
        assert rel < 1e-5, (kind, name, rel)
    stock.unload_lora_weights()  # the adapters changed the result
    with torch.no_grad():
        plain = _one_step_latents(run.teacher, stock, prompts, noise, info["guidance_scale"])
    assert float((plain - expected).norm() / expected.norm()) > 1e-4


def _one_step_latents(teacher, pipe, prompts, noise, guidance):
    """The stock pipeline's one-step latents [B, C, h, w] from ``noise`` (FLUX: packed in and
    out, as FluxPipeline takes them)."""
    pipe.set_progress_bar_config(disable=True)
    h, w = noise.shape[-2:]
    kwargs = {} if guidance is None else {"guidance_scale": guidance}
    latents = pipe(prompts, latents=teacher.pipeline_latents(noise.clone()),
                   num_inference_steps=1, height=teacher.height, width=teacher.width,
                   output_type="latent", **kwargs).images
    if latents.ndim == 3:  # FLUX's packed tokens
        from d2g_fast.teacher.families.flux import unpack

        latents = unpack(latents, h, w)
    return latents


def _adapters_apart(one, two) -> tuple[float, float]:
    """(|G_one - G_two|, |B_one|) over a LoRA G's adapters after step 4 (B starts at zero)."""
    from safetensors.torch import load_file

    g1, g2 = (load_file(os.path.join(d, "checkpoints", "step-0000004", "generator.safetensors"))
              for d in (one, two))
    apart = torch.cat([(g1[k] - g2[k]).flatten() for k in g1]).norm()
    moved = torch.cat([g1[k].flatten() for k in g1 if ".lora_B." in k]).norm()
    return float(apart), float(moved)


def test_two_processes_match_one_at_the_same_global_batch(world, tmp_path):
    """A LoRA student on 2 processes x 1 micro-batch == 1 process x 2 (replicated, gloo);
    sharded (FSDP2, resumed once) with D2G_TEST_LORA_SLOW=1."""
    from test_train import _assert_same_metrics, _torchrun

    one = _config(world, tmp_path / "one", max_steps=4, batch_size=2, grad_accum=2, **LORA)
    proc = subprocess.run(_distill_cmd(one), env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [_config(world, tmp_path / "two", max_steps=4, batch_size=2, **LORA)]
    _torchrun(runs[0], 29537)
    if os.environ.get("D2G_TEST_LORA_SLOW") == "1":
        sharded = _config(world, tmp_path / "fsdp", max_steps=2, batch_size=2, fsdp=True, **LORA)
        _torchrun(sharded, 29538)
        runs.append(dataclasses.replace(sharded, max_steps=4))
        _torchrun(runs[-1], 29539)  # resumes from step 2
    for two in runs:
        _assert_same_metrics(_rows(one.out), _rows(two.out), rel=1e-4)
        apart, moved = _adapters_apart(one.out, two.out)
        assert moved > 0 and apart < 0.01 * moved, (two.out, apart, moved)
