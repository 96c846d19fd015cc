"""The distillation trainer (stage two of Diffusion2GAN): ``d2g distill``, ``d2g export``,
``d2g sample``.

Python::

    from d2g_fast.train import TrainConfig, train
    train(TrainConfig(teacher="sd15/", pairs="pairs/", out="runs/d2g", batch_size=8,
                      lpips_dir="elatentlpips_ckpt/", precision="bf16"))

Pieces, for benchmarks and custom loops::

    from d2g_fast.train import TrainConfig, build_run, train_step
    run = build_run(config, teacher=teacher, dataset=None, device="cuda")
    metrics = train_step(run, batch, step)   # batch: {"noise", "latent", "prompt"}

Modules: config (the one dataclass), generator (G and its x0 conversion), build (inputs checked,
models, losses, optimisers), data (the data order), step (one G + D step), checkpoint (atomic
full state), log (metrics.csv, TensorBoard, progress, sample grids), loop (the loop and
resume), distributed (torchrun processes), export (a one-step diffusers folder).
"""
from d2g_fast.train.build import Run, build_run
from d2g_fast.train.config import TrainConfig, build_config
from d2g_fast.train.export import export_pipeline
from d2g_fast.train.generator import OneStepGenerator, to_x0
from d2g_fast.train.loop import train
from d2g_fast.train.step import train_step

__all__ = ["TrainConfig", "build_config", "Run", "build_run", "train_step", "train",
           "OneStepGenerator", "to_x0", "export_pipeline"]
