"""The light discriminator (``d2g distill --light-d``, issue 22 item 2).

The paper's D trains a whole copy of the teacher's network: as many weights as G, their
gradients and two AdamW moments each. The light D keeps D's backbone frozen at the teacher's
weights and trains only what D adds to it: the z-conditioning (``noise_conv`` / the transformer
D's ``noise_embed``), the UNet D's multi-scale input convs, the multi-scale readout heads, and a
guidance-conditioned UNet D's own guidance input (``guidance_proj``; FLUX-dev's guidance
embedding is part of its frozen backbone). R1 still differentiates through the frozen backbone
with respect to D's input (its weights simply get no gradient).

Two forms:
- G trains every weight: D holds its own frozen copy of the teacher's network (no gradients,
  no optimiser state; still a copy in memory).
- G is a LoRA student (``--lora-rank``): G's network already holds the teacher's frozen weights,
  so D runs G's network itself with the adapters switched off (``adapters_off``) plus its own
  trained parts. There is one copy of the teacher's network for G and D; D does not register G's
  network as a submodule, so D's parameters, optimiser and checkpoint are its trained parts only.
  Checkpointed pieces of D recompute under the same switch (``backbone_context``). FSDP2 shards
  G's network in G's units, which D's block-by-block calls cannot gather: refused
  (``TrainConfig.validate``).

At initialisation every new branch is zero (the heads excepted), so the light D's features
equal the full D's; the two differ only in what training may change.
"""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn


def adapters_off(net: nn.Module):
    """A context factory for running ``net`` as D's backbone: its peft adapters switched off
    (LoRA layers run their base layer only) and diffusers' own block-level gradient
    checkpointing (G's ``--gradient-checkpointing``) off, since its recompute would run after
    the context ends, with the adapters on (D checkpoints its own pieces inside the context).
    Both are restored afterwards, with the adapters' ``requires_grad`` flags (peft's
    ``enable_adapters`` would otherwise reset them). Nested use is a no-op."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in net.modules() if isinstance(m, BaseTunerLayer)]
    checkpointed = [m for m in net.modules() if getattr(m, "gradient_checkpointing", False)]

    @contextlib.contextmanager
    def off():
        if layers and layers[0].disable_adapters:
            yield
            return
        flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
        for layer in layers:
            layer.enable_adapters(False)
        for m in checkpointed:
            m.gradient_checkpointing = False
        try:
            yield
        finally:
            for m in checkpointed:
                m.gradient_checkpointing = True
            for layer in layers:
                layer.enable_adapters(True)
            for p, flag in flags:
                p.requires_grad_(flag)
    return off


def light_discriminator(cls, config, teacher_net: nn.Module, shared_net: nn.Module | None = None):
    """``cls(backbone, config)`` (a DiffusionDiscriminator or TransformerDiscriminator class)
    with its backbone frozen: a frozen deep copy of ``teacher_net``, or, given ``shared_net``
    (a LoRA G's network), that network itself, unregistered and run with its adapters off."""
    if shared_net is None:
        backbone = copy.deepcopy(teacher_net).train()
        backbone.gradient_checkpointing = False  # D checkpoints its own pieces
        backbone.requires_grad_(False)
        return cls(backbone, config)
    # The D classes freeze parts of the backbone they never run: keep G's flags as they are.
    flags = [(p, p.requires_grad) for p in shared_net.parameters()]
    disc = cls(shared_net, config)
    for p, flag in flags:
        p.requires_grad_(flag)
    (name,) = [n for n, m in disc.named_children() if m is shared_net]
    del disc._modules[name]
    object.__setattr__(disc, name, shared_net)  # used, not owned: no parameters, no state
    disc.backbone_context = adapters_off(shared_net)
    return disc


def add_guidance_proj(disc, embed_dim: int) -> None:
    """A guidance-conditioned light UNet D's own guidance input: a zero-initialised bias-free
    linear map of the guidance embedding, added to the timestep embedding where diffusers'
    ``time_embedding.cond_proj`` adds (``DiffusionDiscriminator._time_embedding``)."""
    ref = disc.unet.time_embedding.linear_1.weight
    disc.guidance_proj = nn.Linear(embed_dim, ref.shape[1], bias=False, device=ref.device,
                                   dtype=torch.float32)
    nn.init.zeros_(disc.guidance_proj.weight)


def backbone_of(disc) -> nn.Module:
    """D's backbone network (owned or shared)."""
    return disc.unet if hasattr(disc, "unet") else disc.transformer


def is_shared(disc) -> bool:
    """Whether D runs a network it does not own (a light D on a LoRA G's network)."""
    net = backbone_of(disc)
    return all(m is not net for m in disc.children())
