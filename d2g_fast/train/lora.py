"""LoRA students: G keeps the teacher's weights frozen and trains low-rank adapters on them.

The adapters are peft LoRA layers added the way diffusers' LoRA training scripts add them
(``net.add_adapter(LoraConfig(...))``, Gaussian A and zero B, so G starts exactly as the
teacher's one-step prediction). Only the adapters, and parameters G has that the teacher has not
(a guidance input, ``time_embedding.cond_proj``), are trained, averaged into the EMA and written
to checkpoints; the frozen base is rebuilt from the teacher folder whenever it is needed.

Default target modules: every attention projection (``to_q``, ``to_k``, ``to_v``, ``to_out.0``),
as diffusers' text-to-image LoRA scripts train. The names are the same in SD/SDXL UNets and in
SD3/FLUX transformers, so one default serves every family. Adding convolutions (``conv1``,
``conv2``) or the feed-forward layers (``ff.net.0.proj``, ``ff.net.2``) gives the adapters more
capacity at several times the adapter size; they are opt-in (``--lora-targets``).

A LoRA checkpoint also exports as a diffusers LoRA file (``export_lora_file``) that the stock
``pipe.load_lora_weights(DIR)`` loads onto the teacher's own pipeline.
"""
from __future__ import annotations

import os

import torch

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
LORA_SCHEDULER = "scheduler"


def lora_config(rank: int, alpha: float, targets):
    """peft's LoraConfig of a LoRA student (alpha 0: alpha = rank, i.e. scale 1)."""
    try:
        from peft import LoraConfig
    except ImportError as exc:
        raise ValueError("lora_rank (--lora-rank): LoRA students need the peft package "
                         "(pip install peft)") from exc

    return LoraConfig(r=int(rank), lora_alpha=float(alpha or rank),
                      init_lora_weights="gaussian", target_modules=list(targets))


def settings(config) -> dict | None:
    """The LoRA settings of a run config (a TrainConfig or its stored dict); None: full G."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    rank = int(get("lora_rank", 0) or 0)
    if rank <= 0:
        return None
    return {"rank": rank, "alpha": float(get("lora_alpha", 0.0) or rank),
            "targets": list(get("lora_targets", None) or DEFAULT_TARGETS)}


def add_lora(net: torch.nn.Module, base_names: set[str], lora: dict) -> None:
    """Freeze ``net`` except for parameters not in ``base_names`` (the teacher's own parameter
    names: what is left is G's new guidance input), then add trainable LoRA adapters."""
    extra = [p for n, p in net.named_parameters() if n not in base_names]
    net.requires_grad_(False)
    try:
        net.add_adapter(lora_config(lora["rank"], lora["alpha"], lora["targets"]))
    except ValueError as exc:  # peft: a target matched no module
        raise ValueError(f"lora_targets (--lora-targets): {exc}") from exc
    for p in extra:
        p.requires_grad_(True)


def make_lora_generator(generator, teacher, lora: dict) -> None:
    """Turn G (a full copy of the teacher's network) into a LoRA student in place."""
    base = {n for n, _ in teacher.denoiser.named_parameters()}
    add_lora(generator.net, base, lora)
    # Seeded like every new parameter of the run (build_run seeds before making G).


def trainable_keys(module: torch.nn.Module) -> set[str] | None:
    """State-dict keys of the trainable parameters when some are frozen (a LoRA student);
    None when every parameter trains (full G: the whole state is saved)."""
    params = list(module.named_parameters())
    if all(p.requires_grad for _, p in params):
        return None
    return {n for n, p in params if p.requires_grad}


def lora_net(teacher, weights: dict, lora: dict, guidance_set=None) -> torch.nn.Module:
    """A copy of the teacher family's network with the run's adapters loaded from a checkpoint's
    trainable state ``weights`` (keys of G's network)."""
    import copy

    net = copy.deepcopy(teacher.denoiser).float()
    base = {n for n, _ in net.named_parameters()}
    if guidance_set:
        teacher.add_guidance_input(net)
    add_lora(net, base, lora)
    result = net.load_state_dict(weights, strict=False)
    missing = [k for k in result.missing_keys if k not in _base_keys(net)]
    if result.unexpected_keys or missing:
        raise ValueError(f"checkpoint: LoRA weights do not match the run's adapters "
                         f"(unexpected {result.unexpected_keys[:3]}, missing {missing[:3]})")
    return net


def _base_keys(net) -> set[str]:
    return {n for n, p in net.named_parameters() if not p.requires_grad} | \
        {n for n, _ in net.named_buffers()}


def merged_weights(teacher, weights: dict, lora: dict, guidance_set=None) -> dict:
    """The full network state with the adapters merged into the base weights (diffusers'
    ``fuse_lora`` then ``unload_lora``): what a full G with the same function would hold."""
    net = lora_net(teacher, weights, lora, guidance_set)
    net.fuse_lora(lora_scale=1.0)
    net.unload_lora()
    return net.state_dict()


def export_lora_file(teacher, pipe, weights: dict, lora: dict, out: str, scheduler) -> str:
    """Write ``out/pytorch_lora_weights.safetensors`` in diffusers' LoRA format (the way
    diffusers' train_text_to_image_lora.py saves it, with the adapter config as metadata so
    that alpha survives) and the one-step scheduler in ``out/scheduler``; returns ``out``."""
    from peft.utils import get_peft_model_state_dict
    from diffusers.utils import convert_state_dict_to_diffusers

    net = lora_net(teacher, weights, lora)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(net))
    component = lora_component(pipe)
    os.makedirs(out, exist_ok=True)
    type(pipe).save_lora_weights(out, weight_name=LORA_WEIGHTS, **{
        f"{component}_lora_layers": layers,
        f"{component}_lora_adapter_metadata": net.peft_config["default"].to_dict()})
    scheduler.save_pretrained(os.path.join(out, LORA_SCHEDULER))
    return out


def lora_component(pipe) -> str:
    """The pipeline component the adapters belong to: "unet" or "transformer"."""
    return "unet" if getattr(pipe, "unet", None) is not None else "transformer"


def lora_usage(pipe_class: str, scheduler, lora_dir: str = "LORA_DIR") -> str:
    """How a user samples in one step with the teacher's pipeline and the LoRA file."""
    return (f"pipe = {pipe_class}.from_pretrained(TEACHER); "
            f"pipe.load_lora_weights({lora_dir!r}); "
            f"pipe.scheduler = {type(scheduler).__name__}.from_pretrained({lora_dir!r}, "
            f"subfolder={LORA_SCHEDULER!r})")
