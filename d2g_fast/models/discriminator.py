"""Conditional multi-scale diffusion discriminator D(x, z, c) (paper section 4).

Built from a copy of the teacher's ``UNet2DConditionModel`` (the teacher is never modified):

- text condition c: the UNet's own cross-attention (and SDXL's added conditions
  ``text_embeds``/``time_ids`` through ``added_cond_kwargs``);
- noise condition z: ``noise_conv`` (3x3, zero-initialised) on z, ADDED to the input latent;
- guidance (a guidance-conditioned student): when its UNet has a guidance input
  (``time_cond_proj_dim``, zero-initialised, added by the teacher family), the embedding of
  ``added_cond_kwargs["guidance"]`` (one scale per row) enters its timestep embedding;
- multi-scale input: the latent, area-resized to the input size of every down block after the
  first, enters through a zero-initialised 3x3 conv added to that block's input (for a 64x64
  latent and SD1.5: 32, 16 and 8);
- multi-scale output: readout heads at every decoder scale, taken (``up{i}.before``) on the
  decoder features entering up block i, (``up{i}.skip``) at its first skip connection, i.e. the
  concatenation [decoder features, encoder skip] that its first resnet reads, and
  (``up{i}.after``) on the block's output before its upsampler; plus ``final`` on the UNet's
  output (``conv_out``). With ``multiscale_output=False`` only the last decoder scale's
  ``after`` head is kept (the "diffusion D" row of the ablation);
- fixed timestep: D judges CLEAN latents, so it is fed ``timestep=0`` by default, the timestep at
  which the teacher saw inputs distributed like clean latents (sqrt(alphabar_0) ~ 0.9996);
  configurable for users who want to try another one.

Because every new branch starts at zero, at initialisation D's features are exactly the
teacher's features for the same input (tested).

Ablation switches (paper ablation, FID 12.04 -> 9.45): ``noise_conditioning``,
``multiscale_input``, ``multiscale_output``; R1 and mix-and-match live in d2g_fast.losses.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from d2g_fast.models.heads import MultiScaleHeads

_SUPPORTED_UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclass
class DiscriminatorConfig:
    timestep: int = 0
    noise_conditioning: bool = True
    multiscale_input: bool = True
    multiscale_output: bool = True
    head_weights: Sequence[float] | None = None  # default: 1/K for every head
    head_eps: float = 1e-5
    gradient_checkpointing: bool = False
    # "auto": bf16 autocast on CUDA, none on the CPU; "bf16": always; "no": never.
    mixed_precision: str = "auto"
    heads_impl: str = "auto"


@dataclass
class DiscriminatorOptions:
    """What a run chooses for D whatever the teacher family (``d2g distill``'s D flags), the
    input of every discriminator class's ``build``; each class reads the options it has."""
    # The blocks a transformer D taps (None: its default; the UNet D reads every up block).
    taps: Sequence[int] | None = None
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"      # see DiscriminatorConfig
    noise_conditioning: bool = True
    multiscale_input: bool = True      # the UNet D's multi-scale input convs
    multiscale_output: bool = True     # the UNet D's heads on every up block (else one head)
    light: bool = False                # the light D: its backbone frozen (light_discriminator)
    # The guidance a guidance-embedded transformer D embeds when a batch has none (the
    # family's guidance_for_generator of the collection guidance, as G; None: the D's default).
    guidance: float | None = None
    # Pairs collected over several guidance scales: a UNet D gets its own guidance input.
    guidance_conditioned: bool = False


@dataclass
class DiscriminatorOutput:
    loss: torch.Tensor      # scalar non-saturating loss for the given targets
    scores: torch.Tensor    # (K, N) spatial-mean logit per head and sample
    score: torch.Tensor     # (N,) weighted sum over heads: D's scalar output per sample
    extras: dict = field(default_factory=dict)


def _zero_conv(cin: int, cout: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, kernel_size=3, padding=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class HeadReadout:
    """The readout every discriminator shares: ``features`` -> the fused multi-scale heads ->
    loss, per-head scores and D's scalar score. A subclass provides ``features(latent, noise,
    encoder_hidden_states, added_cond_kwargs)``, ``heads`` (MultiScaleHeads) and ``head_names``."""

    def forward(self, latent: torch.Tensor, noise: torch.Tensor,
                encoder_hidden_states: torch.Tensor,
                added_cond_kwargs: dict[str, torch.Tensor] | None = None,
                target: torch.Tensor | float = 1.0) -> DiscriminatorOutput:
        """Non-saturating loss for ``target`` (+1 real, -1 fake; a float or an (N,) tensor)
        and the raw scores. The heads run outside autocast, accumulating in float32."""
        feats = self.features(latent, noise, encoder_hidden_states, added_cond_kwargs)
        if len({f.dtype for f in feats}) > 1:
            # Autocast can leave taps in different dtypes; the fused op wants one.
            feats = [f.float() for f in feats]
        n = latent.shape[0]
        if not torch.is_tensor(target):
            target = torch.full((n,), float(target), device=latent.device)
        target = target.to(device=latent.device, dtype=torch.float32)
        loss, scores = self.heads(feats, target)
        return DiscriminatorOutput(loss=loss, scores=scores, score=self.heads.combine(scores))

    def score(self, latent, noise, encoder_hidden_states, added_cond_kwargs=None) -> torch.Tensor:
        """D's scalar output per sample (N,): the weighted mean logit over heads."""
        return self.forward(latent, noise, encoder_hidden_states, added_cond_kwargs).score

    def logits(self, latent, noise, encoder_hidden_states, added_cond_kwargs=None):
        """Every head's logit map (N, H_k, W_k), by name."""
        feats = self.features(latent, noise, encoder_hidden_states, added_cond_kwargs)
        return dict(zip(self.head_names, self.heads.logits(feats)))


class DiffusionDiscriminator(HeadReadout, nn.Module):
    # The context D's backbone runs in: a light D on a LoRA G's network switches the
    # adapters off in it (d2g_fast.models.light_discriminator); a plain D needs none.
    backbone_context = staticmethod(contextlib.nullcontext)
    # The DiscriminatorOptions fields ``build`` reads (a run setting another is refused).
    OPTIONS = frozenset({"gradient_checkpointing", "mixed_precision", "noise_conditioning",
                         "multiscale_input", "multiscale_output", "light",
                         "guidance_conditioned"})

    def __init__(self, unet: nn.Module, config: DiscriminatorConfig | None = None):
        """Takes ``unet`` as its own backbone (no copy); use ``from_unet`` to copy a teacher."""
        super().__init__()
        self.config = config or DiscriminatorConfig()
        if self.config.mixed_precision not in ("auto", "bf16", "no"):
            raise ValueError("DiscriminatorConfig.mixed_precision must be 'auto', 'bf16' or 'no', "
                             f"got {self.config.mixed_precision!r}")
        self.unet = unet
        for block in unet.up_blocks:
            name = type(block).__name__
            if name not in _SUPPORTED_UP_BLOCKS:
                raise NotImplementedError(
                    f"DiffusionDiscriminator: up block type {name} is not supported "
                    f"(supported: {', '.join(_SUPPORTED_UP_BLOCKS)})")
        if getattr(unet, "class_embedding", None) is not None:
            raise NotImplementedError("DiffusionDiscriminator: UNets with class embeddings are "
                                      "not supported")
        latent_ch = unet.config.in_channels
        self.noise_conv = _zero_conv(latent_ch, latent_ch) if self.config.noise_conditioning else None
        if self.config.multiscale_input:
            # Down block i > 0 reads the previous block's output channels.
            self.input_convs = nn.ModuleList(
                [_zero_conv(latent_ch, _block_in_channels(b)) for b in unet.down_blocks[1:]])
        else:
            self.input_convs = None
        names, channels = self._tap_layout()
        self.head_names = names
        self.heads = MultiScaleHeads(channels, self.config.head_weights, self.config.head_eps,
                                     self.config.heads_impl)
        # The new branches live where the backbone lives (they stay float32: the UNet runs
        # under autocast, the heads accumulate in float32).
        device = next(unet.parameters()).device
        for module in (self.noise_conv, self.input_convs, self.heads):
            if module is not None:
                module.to(device)

    @classmethod
    def from_unet(cls, unet: nn.Module, config: DiscriminatorConfig | None = None,
                  **overrides: Any) -> "DiffusionDiscriminator":
        """A discriminator whose backbone is a deep copy of ``unet`` (weights copied, trainable;
        the teacher is left untouched). Keyword overrides update ``config``."""
        config = dataclasses.replace(config or DiscriminatorConfig(), **overrides)
        backbone = copy.deepcopy(unet)
        backbone.requires_grad_(True)
        backbone.train()
        return cls(backbone, config)

    @classmethod
    def build(cls, unet: nn.Module, options: DiscriminatorOptions | None = None,
              shared_net: nn.Module | None = None) -> "DiffusionDiscriminator":
        """D on a UNet teacher's network as a run sets it up (every discriminator class has
        this builder; the trainer and the memory bench call it on the teacher family's
        ``discriminator_class()``): a trainable copy of ``unet`` (``from_unet``), or with
        ``options.light`` the light D, its backbone frozen (``shared_net``: a LoRA G's network,
        run instead of a copy). A guidance-conditioned D gets a zero-initialised guidance
        input: G's (diffusers' ``cond_proj``), or for the light D its own ``guidance_proj``
        (the frozen backbone stays the teacher's)."""
        from d2g_fast.models.light_discriminator import add_guidance_proj, light_discriminator
        from d2g_fast.teacher.families.sd import GUIDANCE_EMBED_DIM, add_cond_proj

        options = options or DiscriminatorOptions()
        config = DiscriminatorConfig(
            gradient_checkpointing=options.gradient_checkpointing,
            mixed_precision=options.mixed_precision,
            noise_conditioning=options.noise_conditioning,
            multiscale_input=options.multiscale_input,
            multiscale_output=options.multiscale_output)
        if options.light:
            disc = light_discriminator(cls, config, unet, shared_net)
            if options.guidance_conditioned:
                add_guidance_proj(disc, GUIDANCE_EMBED_DIM)
            return disc
        disc = cls.from_unet(unet, config)
        if options.guidance_conditioned:
            add_cond_proj(disc.unet)
        return disc

    # ------------------------------------------------------------------ layout
    def _tap_layout(self) -> tuple[list[str], list[int]]:
        unet = self.unet
        names, channels = [], []
        prev = _mid_out_channels(unet)
        for i, block in enumerate(unet.up_blocks):
            first, last = block.resnets[0], block.resnets[-1]
            names += [f"up{i}.before", f"up{i}.skip", f"up{i}.after"]
            channels += [prev, first.in_channels, last.out_channels]
            prev = last.out_channels
        names.append("final")
        channels.append(unet.config.out_channels)
        if not self.config.multiscale_output:
            names, channels = names[-2:-1], channels[-2:-1]
        return names, channels

    # ----------------------------------------------------------------- helpers
    def _autocast(self, device: torch.device):
        mode = self.config.mixed_precision
        if mode == "no" or (mode == "auto" and device.type != "cuda"):
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def _run(self, fn, *args):
        if self.config.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(_in_context(self.backbone_context, fn), *args,
                              use_reentrant=False)
        return fn(*args)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.config.gradient_checkpointing = bool(enabled)

    # ----------------------------------------------------------------- forward
    def _guidance_cond(self, added: dict, t_emb: torch.Tensor):
        """A guidance-conditioned D (its UNet given a zero-initialised guidance input,
        ``time_cond_proj_dim``, as G's): the embedding of each row's
        ``added_cond_kwargs["guidance"]``; None otherwise."""
        dim = getattr(self.unet.config, "time_cond_proj_dim", None)
        guidance = added.get("guidance")
        if dim is None or guidance is None:
            return None
        from d2g_fast.teacher.families.sd import guidance_embedding

        return guidance_embedding(guidance, dim).to(t_emb.device, t_emb.dtype)

    def _time_embedding(self, t_emb: torch.Tensor, added: dict) -> torch.Tensor:
        """The UNet's time embedding with the guidance condition: through the UNet's own
        guidance input, or (a light D, d2g_fast.models.light_discriminator) through D's own
        ``guidance_proj``, which adds to the timestep embedding exactly where diffusers'
        ``TimestepEmbedding.cond_proj`` adds, leaving the backbone untouched."""
        proj = getattr(self, "guidance_proj", None)
        if proj is None:
            return self.unet.time_embedding(t_emb, self._guidance_cond(added, t_emb))
        guidance = added.get("guidance")
        if guidance is not None:
            from d2g_fast.teacher.families.sd import guidance_embedding

            cond = guidance_embedding(guidance, proj.in_features).to(t_emb.device, t_emb.dtype)
            t_emb = t_emb + proj(cond)
        return self.unet.time_embedding(t_emb, None)

    def features(self, latent: torch.Tensor, noise: torch.Tensor,
                 encoder_hidden_states: torch.Tensor,
                 added_cond_kwargs: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The features the heads read, in the order of ``head_names``."""
        return self._features(latent, noise, encoder_hidden_states, added_cond_kwargs)[1]

    def all_features(self, latent, noise, encoder_hidden_states, added_cond_kwargs=None):
        """Every tap (``up{i}.before/skip/after`` for all i, then ``final``), whatever
        ``multiscale_output`` says."""
        return self._features(latent, noise, encoder_hidden_states, added_cond_kwargs)[0]

    def _features(self, latent, noise, encoder_hidden_states, added_cond_kwargs):
        _check_inputs(latent, noise, encoder_hidden_states, self.unet.config.in_channels)
        unet = self.unet
        added = added_cond_kwargs or {}
        with self._autocast(latent.device), self.backbone_context():
            x = latent
            if unet.config.center_input_sample:
                x = 2 * x - 1.0
            if self.noise_conv is not None:
                x = x + self.noise_conv(noise.to(x.dtype))

            t_emb = unet.get_time_embed(sample=x, timestep=self.config.timestep)
            emb = self._time_embedding(t_emb, added)
            aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                                     added_cond_kwargs=added)
            if aug is not None:
                emb = emb + aug
            if unet.time_embed_act is not None:
                emb = unet.time_embed_act(emb)
            ehs = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states,
                                                     added_cond_kwargs=added)

            # Latents whose size is not a multiple of the total down factor: force the upsample
            # sizes, as the UNet does.
            up_factor = 2 ** unet.num_upsamplers
            force_sizes = any(s % up_factor != 0 for s in latent.shape[-2:])

            h = unet.conv_in(x)
            skips: tuple[torch.Tensor, ...] = (h,)
            for i, block in enumerate(unet.down_blocks):
                if i > 0 and self.input_convs is not None:
                    small = F.interpolate(latent, size=h.shape[-2:], mode="area")
                    h = h + self.input_convs[i - 1](small.to(h.dtype))
                if getattr(block, "has_cross_attention", False):
                    h, res = self._run(lambda hh, e, c, b=block: b(hidden_states=hh, temb=e,
                                                                  encoder_hidden_states=c),
                                       h, emb, ehs)
                else:
                    h, res = self._run(lambda hh, e, b=block: b(hidden_states=hh, temb=e), h, emb)
                skips += tuple(res)

            if unet.mid_block is not None:
                if getattr(unet.mid_block, "has_cross_attention", False):
                    h = self._run(lambda hh, e, c: unet.mid_block(hh, e, encoder_hidden_states=c),
                                  h, emb, ehs)
                else:
                    h = self._run(lambda hh, e: unet.mid_block(hh, e), h, emb)

            taps = []
            n_up = len(unet.up_blocks)
            for i, block in enumerate(unet.up_blocks):
                res = skips[-len(block.resnets):]
                skips = skips[:-len(block.resnets)]
                upsample_size = skips[-1].shape[2:] if (i < n_up - 1 and force_sizes) else None
                taps.append(h)  # before the skip connection
                attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
                for j, (resnet, attn) in enumerate(zip(block.resnets, attentions)):
                    h = torch.cat([h, res[-(j + 1)]], dim=1)
                    if j == 0:
                        taps.append(h)  # at the skip connection
                    h = self._run(_resnet_attn_step(resnet, attn), h, emb, ehs)
                taps.append(h)  # after the skip connections, before the upsampler
                if block.upsamplers is not None:
                    for up in block.upsamplers:
                        h = up(h, upsample_size)

            out = h
            if unet.conv_norm_out is not None:
                out = unet.conv_act(unet.conv_norm_out(out))
            out = unet.conv_out(out)
            taps.append(out)
        if not self.config.multiscale_output:
            return taps, taps[-2:-1]
        return taps, taps


def _in_context(context, fn):
    """``fn`` run inside ``context()``: a checkpointed piece of D recomputes in the backward
    pass under the same backbone context as its forward (a light D's adapters switched off)."""
    def run(*args):
        with context():
            return fn(*args)
    return run


def _resnet_attn_step(resnet, attn):
    def step(h, emb, ehs):
        h = resnet(h, emb)
        if attn is not None:
            h = attn(h, encoder_hidden_states=ehs, return_dict=False)[0]
        return h
    return step


def _block_in_channels(block) -> int:
    return block.resnets[0].in_channels


def _mid_out_channels(unet) -> int:
    if unet.mid_block is not None:
        return unet.mid_block.resnets[-1].out_channels
    return unet.down_blocks[-1].resnets[-1].out_channels


def _check_inputs(latent, noise, ehs, channels):
    if not torch.is_tensor(latent) or latent.dim() != 4:
        raise ValueError(f"DiffusionDiscriminator: 'latent' must be (N, C, H, W), got "
                         f"{getattr(latent, 'shape', type(latent))}")
    if latent.shape[1] != channels:
        raise ValueError(f"DiffusionDiscriminator: 'latent' must have {channels} channels, got "
                         f"shape {tuple(latent.shape)}")
    if not torch.is_tensor(noise) or noise.shape != latent.shape:
        raise ValueError(f"DiffusionDiscriminator: 'noise' must have the latent's shape "
                         f"{tuple(latent.shape)}, got {getattr(noise, 'shape', type(noise))}")
    if not torch.is_tensor(ehs) or ehs.dim() != 3 or ehs.shape[0] != latent.shape[0]:
        raise ValueError("DiffusionDiscriminator: 'encoder_hidden_states' must be (N, tokens, dim) "
                         f"with N = {latent.shape[0]}, got {getattr(ehs, 'shape', type(ehs))}")
