"""Scheduler choice by short name (or any diffusers scheduler class name)."""
from __future__ import annotations

# Short names users know from the diffusers docs -> diffusers class names.
SCHEDULER_NAMES = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}

# Schedulers whose step draws fresh noise: their pairs are no longer a deterministic ODE map.
STOCHASTIC = {"DDPMScheduler", "EulerAncestralDiscreteScheduler"}


def scheduler_class(name: str):
    """The diffusers scheduler class for a short name ("ddim", "euler", "dpm++", ...) or a class
    name ("DDIMScheduler"). Raises ValueError naming ``scheduler`` for unknown names."""
    import diffusers

    cls_name = SCHEDULER_NAMES.get(name.lower(), name)
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not hasattr(cls, "from_config") or not cls_name.endswith("Scheduler"):
        raise ValueError(
            f"scheduler (--scheduler): unknown scheduler {name!r}; use one of "
            f"{sorted(SCHEDULER_NAMES)} or a diffusers scheduler class name")
    return cls


def make_scheduler(name: str | None, base_config):
    """A new scheduler of the named kind built from the teacher's scheduler config (the way
    diffusers users swap schedulers: ``Cls.from_config(pipe.scheduler.config)``)."""
    cls = scheduler_class(name or "ddim")
    return cls.from_config(base_config)
