"""Export a trained generator as a diffusers pipeline folder that runs in ONE step.

The folder is the teacher's pipeline (VAE, text encoder(s), tokenizer(s)) with the student's UNet
(EMA weights by default) and a DDIMScheduler configured so that ``num_inference_steps=1``
reproduces G exactly:
  * ``timestep_spacing="trailing"``: one step evaluates the UNet at the last training timestep,
    the timestep G is trained at by default;
  * ``set_alpha_to_one=True``: the step goes to alpha = 1, so DDIM's update returns its
    ``pred_original_sample``, which is G's x0 formula (d2g_fast.train.generator.to_x0);
  * ``prediction_type``: the teacher's (or "sample" for an x0-parameterised student).
Run it with guidance off (``guidance_scale=1``): G was distilled from guided teacher samples and
takes no guidance itself::

    pipe = DiffusionPipeline.from_pretrained(DIR)
    image = pipe("a photo of a cat", num_inference_steps=1, guidance_scale=1.0).images[0]
"""
from __future__ import annotations

import json
import os

from d2g_fast.train import checkpoint as ckpt
from d2g_fast.train.loop import read_run_config

STUDENT_INFO = "d2g_student.json"


def find_checkpoint(run_dir: str, step: int | None) -> str:
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run_dir: no such folder {run_dir!r}")
    read_run_config(run_dir)
    if step is None:
        path = ckpt.latest_checkpoint(run_dir)
        if path is None:
            raise ValueError(f"run_dir: {run_dir!r} has no complete checkpoint yet")
        return path
    path = os.path.join(ckpt.checkpoints_dir(run_dir), ckpt.checkpoint_name(step))
    if not os.path.isfile(os.path.join(path, ckpt.COMPLETE)):
        have = [s for s, _ in ckpt.list_checkpoints(run_dir)]
        raise ValueError(f"step (--step): no complete checkpoint for step {step} in {run_dir!r} "
                         f"(have {have})")
    return path


def one_step_scheduler(base_config, prediction_type: str):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(base_config, timestep_spacing="trailing",
                                     set_alpha_to_one=True, prediction_type=prediction_type,
                                     clip_sample=False, thresholding=False,
                                     rescale_betas_zero_snr=False)


def export_pipeline(run_dir: str, out: str, step: int | None = None,
                    use_ema: bool = True) -> str:
    """Write the one-step pipeline folder ``out`` from a run folder; returns ``out``."""
    from diffusers import DiffusionPipeline

    from d2g_fast.data.store import atomic_write_json, ensure_writable

    path = find_checkpoint(run_dir, step)
    state = ckpt.read_state(path)
    teacher_dir = state["teacher"]
    if not os.path.isfile(os.path.join(teacher_dir, "model_index.json")):
        raise FileNotFoundError(f"the run's teacher folder {teacher_dir!r} is gone; the export "
                                f"takes the VAE and text encoders from it")
    gen = state["generator"]
    pipe = DiffusionPipeline.from_pretrained(teacher_dir, local_files_only=True)
    last = int(pipe.scheduler.config.num_train_timesteps) - 1
    if gen["timestep"] != last:
        raise ValueError(f"run_dir: the generator was trained at timestep {gen['timestep']}; "
                         f"diffusers' one-step schedule evaluates the UNet at {last} only, so "
                         f"only students trained at the default --timestep export to a pipeline")
    pipe.unet.load_state_dict(ckpt.load_generator_weights(path, use_ema=use_ema))
    pipe.scheduler = one_step_scheduler(pipe.scheduler.config, gen["prediction_type"])
    out = ensure_writable(out)
    pipe.save_pretrained(out, safe_serialization=True)
    atomic_write_json(os.path.join(out, STUDENT_INFO), {
        "format": "d2g_fast one-step student", "checkpoint": os.path.abspath(path),
        "step": state["step"], "weights": "ema" if use_ema and state["config"]["ema_decay"] > 0
        else "generator", "timestep": gen["timestep"], "prediction_type": gen["prediction_type"],
        "teacher": teacher_dir, "teacher_sha256": state["teacher_sha256"],
        "usage": "DiffusionPipeline.from_pretrained(DIR)(prompt, num_inference_steps=1, "
                 "guidance_scale=1.0)"})
    return out


def read_student_info(model_dir: str) -> dict | None:
    path = os.path.join(model_dir, STUDENT_INFO)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)
