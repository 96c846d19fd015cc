"""Export a trained generator as a diffusers pipeline folder that runs in ONE step.

The folder is the teacher's own pipeline class (its VAE, text encoder(s), tokenizer(s)) with the
student's network (EMA weights by default) and a scheduler, chosen by the teacher family
(``export_scheduler``), that makes the stock ``pipe(prompt, num_inference_steps=1, ...)`` call
the network exactly once and return G's x0:
  * UNets (sd, sdxl): DDIM with ``timestep_spacing="trailing"`` (the one step evaluates the UNet
    at the last training timestep, G's default) and ``set_alpha_to_one=True`` (the step returns
    DDIM's ``pred_original_sample``: G's x0 formula), with the teacher's ``prediction_type`` (or
    "sample" for an x0-parameterised student);
  * flow-matching transformers (sd3, flux): the folder's FlowMatchEulerDiscreteScheduler with
    terminal shift, inverted/Karras/exponential/beta sigmas and stochastic sampling off; its one
    sigma is 1 for any shift or dynamic-shifting mu, and the Euler step to 0 is z - v: G.
The ``guidance_scale`` a user must pass is written to ``d2g_student.json`` ("guidance_scale"):
1.0 for sd, sdxl and sd3 (the student was distilled from classifier-free-guided samples and
takes no CFG itself); for FLUX-dev the collection guidance, which G's guidance embedding was
trained with; null for FLUX-schnell (no guidance input). The training resolution is recorded too
("resolution"; pass it as height/width)::

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
    """The UNet families' one-step DDIM (kept for existing callers; see
    ``families.sd.UNetFamily.export_scheduler``)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(base_config, timestep_spacing="trailing",
                                     set_alpha_to_one=True, prediction_type=prediction_type,
                                     clip_sample=False, thresholding=False,
                                     rescale_betas_zero_snr=False)


def student_pipeline(teacher_dir: str, weights: dict, generator: dict, lora: dict | None = None):
    """The teacher's pipeline (loaded from ``teacher_dir``) with G's network ``weights`` and the
    family's one-step scheduler. ``generator`` is G's record in a checkpoint
    (``OneStepGenerator.describe()``: timestep, prediction_type, guidance). With ``lora`` (the
    run's LoRA settings) ``weights`` are the adapters, merged into the teacher's weights here.
    Returns (pipeline, family instance). Refuses students the stock pipeline cannot
    reproduce."""
    from diffusers import DiffusionPipeline

    from d2g_fast.teacher.families import family_for_pipeline

    pipe = DiffusionPipeline.from_pretrained(teacher_dir, local_files_only=True)
    teacher = family_for_pipeline(pipe).from_pipeline(pipe)
    teacher.export_check(generator)
    if lora is not None:  # adapters (+ guidance input) on the teacher's weights, merged
        from d2g_fast.train.lora import merged_weights

        weights = merged_weights(teacher, weights, lora, generator.get("guidance_set"))
    if generator.get("guidance_set"):  # a guidance-conditioned student: G's guidance input
        teacher.add_guidance_input(teacher.denoiser)
    teacher.denoiser.load_state_dict(weights)
    pipe.scheduler = teacher.export_scheduler(generator["prediction_type"])
    return pipe, teacher


def student_info(teacher, generator: dict, pipeline_class: str) -> dict:
    """The family-dependent part of ``d2g_student.json``: how to call the exported pipeline.
    A guidance-conditioned student records its guidance set (``guidance_set``: any scale in it
    may be passed) and the middle of it as the default ``guidance_scale``."""
    from d2g_fast.train.generator import middle_guidance

    guidance_set = generator.get("guidance_set")
    guidance = middle_guidance(guidance_set) if guidance_set else \
        teacher.export_guidance(generator.get("guidance"))
    resolution = generator.get("resolution")
    call = f"num_inference_steps=1, guidance_scale={guidance!r}" if guidance is not None \
        else "num_inference_steps=1"
    if resolution:
        call += f", height={resolution[0]}, width={resolution[1]}"
    return {"family": teacher.name, "pipeline_class": pipeline_class, "guidance_scale": guidance,
            "guidance_set": guidance_set, "resolution": resolution,
            "usage": f"DiffusionPipeline.from_pretrained(DIR)(prompt, {call})"}


def export_pipeline(run_dir: str, out: str, step: int | None = None,
                    use_ema: bool = True, lora_file: bool = False) -> str:
    """Write the one-step pipeline folder ``out`` from a run folder; returns ``out``. With
    ``lora_file`` (a LoRA run) also ``out/lora/``: the adapters as a diffusers LoRA file for
    the teacher's own pipeline, and the one-step scheduler (see d2g_fast.train.lora)."""
    from d2g_fast.data.store import atomic_write_json, ensure_writable
    from d2g_fast.runtime.checksums import record_folder

    path = find_checkpoint(run_dir, step)
    state = ckpt.read_state(path)
    teacher_dir = state["teacher"]
    if not os.path.isfile(os.path.join(teacher_dir, "model_index.json")):
        raise FileNotFoundError(f"the run's teacher folder {teacher_dir!r} is gone; the export "
                                f"takes the VAE and text encoders from it")
    gen = state["generator"]
    from d2g_fast.train.lora import settings

    lora = settings(state["config"])
    if lora_file and lora is None:
        raise ValueError(f"lora (--lora): {run_dir!r} trained every weight of G (no "
                         f"--lora-rank); there are no adapters to export")
    if lora_file and gen.get("guidance_set"):
        raise ValueError("lora (--lora): this student has a trained guidance input, which a "
                         "diffusers LoRA file cannot carry; export the merged pipeline only")
    weights = ckpt.load_generator_weights(path, use_ema=use_ema)
    pipe, teacher = student_pipeline(teacher_dir, weights, gen, lora)
    out = ensure_writable(out)
    pipe.save_pretrained(out, safe_serialization=True)
    info = student_info(teacher, gen, type(pipe).__name__)
    if lora_file:
        info.update(write_lora_file(teacher_dir, weights, lora, pipe.scheduler,
                                    os.path.join(out, LORA_DIR)))
    atomic_write_json(os.path.join(out, STUDENT_INFO), {
        "format": "d2g_fast one-step student", "checkpoint": os.path.abspath(path),
        "step": state["step"], "weights": "ema" if use_ema and state["config"]["ema_decay"] > 0
        else "generator", "timestep": gen["timestep"], "prediction_type": gen["prediction_type"],
        "teacher": teacher_dir, "teacher_sha256": state["teacher_sha256"],
        # The weights' sizes and sha256, checked by d2g verify OUT (d2g_fast.runtime.verify).
        "files": record_folder(out, suffixes=(".safetensors", ".bin")), **info})
    return out


LORA_DIR = "lora"


def write_lora_file(teacher_dir: str, weights: dict, lora: dict, scheduler, out: str) -> dict:
    """The adapters as a diffusers LoRA file in ``out`` (with the one-step scheduler); returns
    the part of d2g_student.json that says how to use it."""
    from diffusers import DiffusionPipeline

    from d2g_fast.teacher.families import family_for_pipeline
    from d2g_fast.train.lora import export_lora_file, lora_usage

    # A fresh teacher: the exported pipeline's network already holds the merged weights.
    pipe = DiffusionPipeline.from_pretrained(teacher_dir, local_files_only=True)
    teacher = family_for_pipeline(pipe).from_pipeline(pipe)
    export_lora_file(teacher, pipe, weights, lora, out, scheduler)
    return {"lora": {"folder": LORA_DIR, "rank": lora["rank"], "alpha": lora["alpha"],
                     "targets": lora["targets"],
                     "usage": lora_usage(type(pipe).__name__, scheduler)}}


def read_student_info(model_dir: str) -> dict | None:
    path = os.path.join(model_dir, STUDENT_INFO)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)
