"""Conditional multi-scale discriminator D(x, z, c) built from a flow-matching transformer teacher
(SD3 / SD3.5 ``SD3Transformer2DModel``, FLUX.1 ``FluxTransformer2DModel``): the paper's UNet
discriminator (d2g_fast.models.discriminator) carried over to a transformer.

Built from a trainable copy of the teacher's transformer (the teacher is never modified):

- text condition c: the transformer's own streams: the T5/CLIP token embeddings enter through its
  ``context_embedder`` and joint attention, the pooled CLIP embedding through its
  ``time_text_embed`` (and, for guidance-distilled FLUX.1-dev, the guidance embedding);
- noise condition z: a zero-initialised copy of the image embedder (SD3: the patch convolution;
  FLUX: the linear layer on packed 2x2 patches) applied to z and ADDED to the image tokens, so at
  initialisation D's features are exactly the teacher's;
- multi-scale output: readout heads on the IMAGE tokens leaving several transformer blocks
  (``taps``), reshaped to the latent token grid (SD3: h/p x w/p; FLUX: h/2 x w/2) and average-
  pooled by every factor in ``scales`` (default 1, 2, 4: three scales per tap). All heads run in
  one call of the fused ``multiscale_heads`` op. Blocks after the last tap are never run.
- fixed noise level: D judges CLEAN latents, so it runs at ``sigma = 0`` (the flow's data end)
  by default.

Default taps: the last block of each quarter of the stack: for L blocks the blocks
floor(L q / 4) - 1, q = 1..4 (SD3-medium's 24 joint blocks: 5, 11, 17, 23; FLUX.1's 19 double +
38 single blocks, numbered in forward order 0..56: 13, 27, 41, 56). Set ``taps`` to choose.

The interface is the UNet discriminator's, so ``DiscriminatorLoss`` (mix-and-match, single-sample
R1) and ``generator_loss`` work unchanged: ``D(latent, noise, encoder_hidden_states,
added_cond_kwargs, target)`` with latents UNPACKED ([N, 16, h, w], as the pair store holds them)
and ``added_cond_kwargs = {"pooled_projections": [N, P]}`` (+ optionally ``"guidance": [N]`` for
guidance-embedded FLUX; else ``config.guidance``).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from d2g_fast.models.discriminator import DiscriminatorOptions, HeadReadout, _in_context
from d2g_fast.models.heads import MultiScaleHeads

DEFAULT_TAP_COUNT = 4
# Every released SD3/SD3.5 scheduler has num_train_timesteps 1000 and the SD3 pipeline feeds the
# transformer timestep = sigma * 1000; FLUX's pipeline feeds sigma (the transformer scales by 1000).
SD3_TIMESTEP_SCALE = 1000.0
# FluxPipeline's default guidance_scale: what a guidance-embedded D is fed when the batch has
# none.
FLUX_DEFAULT_GUIDANCE = 3.5


@dataclass
class TransformerDiscriminatorConfig:
    taps: Sequence[int] | None = None        # block indices; None: default_taps(num_blocks)
    scales: Sequence[int] = (1, 2, 4)        # average-pooling factors of each tap's token grid
    sigma: float = 0.0                       # the noise level D runs at (0 = clean data)
    guidance: float = FLUX_DEFAULT_GUIDANCE  # guidance-embedded transformers without a batch value
    noise_conditioning: bool = True
    head_weights: Sequence[float] | None = None  # default: 1/K for every head
    head_eps: float = 1e-5
    gradient_checkpointing: bool = False
    # "auto": bf16 autocast on CUDA, none on the CPU; "bf16": always; "no": never.
    mixed_precision: str = "auto"
    heads_impl: str = "auto"


def default_taps(num_blocks: int, count: int = DEFAULT_TAP_COUNT) -> list[int]:
    """The last block of each of ``count`` equal parts of ``num_blocks`` blocks (the last block
    always included)."""
    return sorted({max(0, num_blocks * q // count - 1) for q in range(1, count + 1)})


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class TransformerDiscriminator(HeadReadout, nn.Module):
    """Base class: the taps, heads, checks and the forward; subclasses say how one transformer
    family turns latents into tokens and calls its blocks (the teacher family's
    ``discriminator_class()`` names its subclass). Build with :meth:`build` or
    :meth:`from_transformer` on a subclass."""

    # The context D's backbone runs in (a light D on a LoRA G's network: adapters off).
    backbone_context = staticmethod(contextlib.nullcontext)
    # The DiscriminatorOptions fields ``build`` reads (a run setting another is refused).
    OPTIONS = frozenset({"taps", "gradient_checkpointing", "mixed_precision",
                         "noise_conditioning", "light", "guidance"})

    def __init__(self, transformer: nn.Module,
                 config: TransformerDiscriminatorConfig | None = None):
        """Takes ``transformer`` as its own backbone (no copy); ``from_transformer`` copies."""
        if type(self) is TransformerDiscriminator:
            raise TypeError("TransformerDiscriminator is the base class: build the teacher "
                            "family's subclass (its discriminator_class(): SD3Discriminator "
                            "for SD3 transformers, FluxDiscriminator for FLUX ones)")
        super().__init__()
        self.config = config or TransformerDiscriminatorConfig()
        if self.config.mixed_precision not in ("auto", "bf16", "no"):
            raise ValueError("TransformerDiscriminatorConfig.mixed_precision must be 'auto', "
                             f"'bf16' or 'no', got {self.config.mixed_precision!r}")
        self.transformer = transformer
        n = len(self.blocks())
        taps = default_taps(n) if self.config.taps is None else [int(t) for t in self.config.taps]
        if not taps or sorted(set(taps)) != taps or taps[0] < 0 or taps[-1] >= n:
            raise ValueError(f"taps (--d-taps): distinct increasing block indices in [0, {n - 1}] "
                             f"({type(transformer).__name__} has {n} blocks), got "
                             f"{list(self.config.taps)}")
        scales = [int(s) for s in self.config.scales]
        if not scales or min(scales) < 1 or len(set(scales)) != len(scales):
            raise ValueError(f"scales: distinct pooling factors >= 1, got "
                             f"{list(self.config.scales)}")
        self.taps, self.scales = taps, scales
        # What D never runs (blocks after the last tap, the output layers) is frozen: no
        # optimiser state, no gradient traffic.
        for module in self.blocks()[taps[-1] + 1:] + self.unused_modules():
            module.requires_grad_(False)
        self.head_names = [f"block{t}.x{s}" for t in taps for s in scales]
        width = int(transformer.inner_dim)
        self.heads = MultiScaleHeads([width] * len(self.head_names), self.config.head_weights,
                                     self.config.head_eps, self.config.heads_impl)
        self.noise_embed = _zero(self.make_noise_embed()) if self.config.noise_conditioning \
            else None
        device = next(transformer.parameters()).device
        for module in (self.noise_embed, self.heads):
            if module is not None:
                module.to(device)

    @classmethod
    def build(cls, transformer: nn.Module, options: DiscriminatorOptions | None = None,
              shared_net: nn.Module | None = None) -> "TransformerDiscriminator":
        """D on a transformer teacher's network as a run sets it up (every discriminator class
        has this builder; the trainer and the memory bench call it on the teacher family's
        ``discriminator_class()``): a trainable copy of ``transformer``
        (``from_transformer``), or with ``options.light`` the light D, its backbone frozen
        (``shared_net``: a LoRA G's network, run instead of a copy). The multi-scale input
        switches are the UNet D's; a guidance-conditioned run needs nothing added: FLUX-dev's
        D takes each row's guidance through its own guidance embedding (the other transformer
        families have no guidance input for G, which refuses such pairs first)."""
        from d2g_fast.models.light_discriminator import light_discriminator

        options = options or DiscriminatorOptions()
        embedded = {} if options.guidance is None else {"guidance": options.guidance}
        config = TransformerDiscriminatorConfig(
            taps=None if options.taps is None else list(options.taps),
            gradient_checkpointing=options.gradient_checkpointing,
            mixed_precision=options.mixed_precision,
            noise_conditioning=options.noise_conditioning, **embedded)
        if options.light:
            return light_discriminator(cls, config, transformer, shared_net)
        return cls.from_transformer(transformer, config)

    @classmethod
    def from_transformer(cls, transformer: nn.Module,
                         config: TransformerDiscriminatorConfig | None = None,
                         **overrides: Any) -> "TransformerDiscriminator":
        """A discriminator of this subclass (``SD3Discriminator`` on an
        ``SD3Transformer2DModel``, ``FluxDiscriminator`` on a ``FluxTransformer2DModel``) whose
        backbone is a deep, trainable copy of ``transformer``. Keyword overrides update
        ``config``."""
        config = dataclasses.replace(config or TransformerDiscriminatorConfig(), **overrides)
        backbone = copy.deepcopy(transformer).requires_grad_(True).train()
        backbone.gradient_checkpointing = False  # D checkpoints its own block calls
        return cls(backbone, config)

    # ------------------------------------------------------- per-family (subclasses)
    def blocks(self) -> list[nn.Module]:
        """The transformer blocks in execution order (what ``taps`` index)."""
        raise NotImplementedError

    def latent_channels(self) -> int:
        raise NotImplementedError

    def patch(self) -> int:
        """Latent pixels per token side."""
        raise NotImplementedError

    def make_noise_embed(self) -> nn.Module:
        raise NotImplementedError

    def unused_modules(self) -> list[nn.Module]:
        """The transformer's output layers, which D never runs (it reads block outputs)."""
        return [self.transformer.norm_out, self.transformer.proj_out]

    def embed(self, latent, noise, encoder_hidden_states, added) -> tuple:
        """(image tokens [N, T, D] with the noise added, text tokens, temb, extra block kwargs)."""
        raise NotImplementedError

    def run_block(self, block, image, text, temb, extra) -> tuple[torch.Tensor, torch.Tensor]:
        """(text tokens, image tokens) after ``block``."""
        raise NotImplementedError

    def fsdp_units(self) -> list[nn.Module]:
        """The blocks D runs (FSDP2 units: one per transformer block; the embedders, the noise
        branch and the heads stay in the root unit)."""
        return self.blocks()[:self.taps[-1] + 1]

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.config.gradient_checkpointing = bool(enabled)

    # ----------------------------------------------------------------- helpers
    def _autocast(self, device: torch.device):
        mode = self.config.mixed_precision
        if mode == "no" or (mode == "auto" and device.type != "cuda"):
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def _block(self, block, image, text, temb, extra):
        def call(image, text, temb):
            return self.run_block(block, image, text, temb, extra)
        if self.config.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(_in_context(self.backbone_context, call), image, text, temb,
                              use_reentrant=False)
        return call(image, text, temb)

    def _check_inputs(self, latent, noise, ehs, added):
        c, p = self.latent_channels(), self.patch()
        if not torch.is_tensor(latent) or latent.dim() != 4 or latent.shape[1] != c:
            raise ValueError(f"{type(self).__name__}: 'latent' must be (N, {c}, H, W) (unpacked "
                             f"latents), got {getattr(latent, 'shape', type(latent))}")
        if latent.shape[2] % p or latent.shape[3] % p:
            raise ValueError(f"{type(self).__name__}: the latent size {tuple(latent.shape[2:])} "
                             f"is not divisible by the patch size {p}")
        if not torch.is_tensor(noise) or noise.shape != latent.shape:
            raise ValueError(f"{type(self).__name__}: 'noise' must have the latent's shape "
                             f"{tuple(latent.shape)}, got {getattr(noise, 'shape', type(noise))}")
        if not torch.is_tensor(ehs) or ehs.dim() != 3 or ehs.shape[0] != latent.shape[0]:
            raise ValueError(f"{type(self).__name__}: 'encoder_hidden_states' must be (N, tokens, "
                             f"dim) with N = {latent.shape[0]}, got "
                             f"{getattr(ehs, 'shape', type(ehs))}")
        pooled = (added or {}).get("pooled_projections")
        if not torch.is_tensor(pooled) or pooled.dim() != 2 or pooled.shape[0] != latent.shape[0]:
            raise ValueError(f"{type(self).__name__}: 'added_cond_kwargs' must hold "
                             f"'pooled_projections' (N, P) with N = {latent.shape[0]}, got "
                             f"{getattr(pooled, 'shape', pooled)}")

    # ----------------------------------------------------------------- forward
    def tap_tokens(self, latent, noise, encoder_hidden_states, added_cond_kwargs=None):
        """The image tokens [N, T, D] leaving every tapped block, in the order of ``taps``."""
        self._check_inputs(latent, noise, encoder_hidden_states, added_cond_kwargs)
        out = []
        with self._autocast(latent.device), self.backbone_context():
            image, text, temb, extra = self.embed(latent, noise, encoder_hidden_states,
                                                  added_cond_kwargs)
            for i, block in enumerate(self.blocks()[:self.taps[-1] + 1]):
                text, image = self._block(block, image, text, temb, extra)
                if i in self.taps:
                    out.append(image)
        return out

    def features(self, latent, noise, encoder_hidden_states, added_cond_kwargs=None):
        """The maps [N, D, h_k, w_k] the heads read, in the order of ``head_names``."""
        p = self.patch()
        gh, gw = latent.shape[2] // p, latent.shape[3] // p
        feats = []
        for tokens in self.tap_tokens(latent, noise, encoder_hidden_states, added_cond_kwargs):
            grid = tokens.transpose(1, 2).unflatten(2, (gh, gw))  # channels-last [N, D, gh, gw]
            for s in self.scales:
                feats.append(grid if s == 1 else
                             F.adaptive_avg_pool2d(grid, (-(-gh // s), -(-gw // s))))
        return feats


class SD3Discriminator(TransformerDiscriminator):
    """``SD3Transformer2DModel`` backbone (SD3 / SD3.5): patch-conv tokens, joint blocks."""

    def blocks(self):
        return list(self.transformer.transformer_blocks)

    def latent_channels(self):
        return int(self.transformer.config.in_channels)

    def patch(self):
        return int(self.transformer.config.patch_size)

    def make_noise_embed(self):
        proj = self.transformer.pos_embed.proj
        return nn.Conv2d(proj.in_channels, proj.out_channels, proj.kernel_size, proj.stride,
                         bias=True)

    def embed(self, latent, noise, ehs, added):
        t = self.transformer
        image = t.pos_embed(latent.to(_dtype(t)))   # patchify + positional embedding
        if self.noise_embed is not None:
            image = image + self.noise_embed(noise.to(image.dtype)).flatten(2).transpose(1, 2)
        timestep = torch.full((latent.shape[0],), self.config.sigma * SD3_TIMESTEP_SCALE,
                              device=latent.device)
        temb = t.time_text_embed(timestep, added["pooled_projections"].to(image.dtype))
        text = t.context_embedder(ehs.to(image.dtype))
        return image.contiguous(), text, temb, {}

    def run_block(self, block, image, text, temb, extra):
        return block(hidden_states=image, encoder_hidden_states=text, temb=temb)


class FluxDiscriminator(TransformerDiscriminator):
    """``FluxTransformer2DModel`` backbone (FLUX.1): latents packed into 2x2 patches (the
    pipeline's ``_pack_latents``), rotary position ids, double then single blocks."""

    def blocks(self):
        t = self.transformer
        return list(t.transformer_blocks) + list(t.single_transformer_blocks)

    def latent_channels(self):
        return int(self.transformer.config.in_channels) // 4

    def patch(self):
        return 2

    def make_noise_embed(self):
        lin = self.transformer.x_embedder
        return nn.Linear(lin.in_features, lin.out_features, bias=True)

    def embed(self, latent, noise, ehs, added):
        from diffusers import FluxPipeline

        t = self.transformer
        n, c, h, w = latent.shape
        dtype = _dtype(t)
        image = t.x_embedder(FluxPipeline._pack_latents(latent.to(dtype), n, c, h, w))
        if self.noise_embed is not None:
            image = image + self.noise_embed(
                FluxPipeline._pack_latents(noise.to(image.dtype), n, c, h, w))
        # FluxTransformer2DModel.forward multiplies the pipeline's sigma and guidance by 1000
        # before embedding them; the embedding is called directly here, so with the factor.
        timestep = torch.full((n,), self.config.sigma * SD3_TIMESTEP_SCALE, device=latent.device,
                              dtype=image.dtype)
        pooled = added["pooled_projections"].to(image.dtype)
        if t.config.guidance_embeds:
            guidance = added.get("guidance")
            if guidance is None:
                guidance = torch.full((n,), self.config.guidance, device=latent.device)
            temb = t.time_text_embed(timestep, guidance.to(image.dtype) * 1000, pooled)
        else:
            temb = t.time_text_embed(timestep, pooled)
        text = t.context_embedder(ehs.to(image.dtype))
        img_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, latent.device,
                                                         image.dtype)
        txt_ids = torch.zeros(ehs.shape[1], 3, device=latent.device, dtype=image.dtype)
        rotary = t.pos_embed(torch.cat([txt_ids, img_ids], dim=0))
        return image, text, temb, {"image_rotary_emb": rotary}

    def run_block(self, block, image, text, temb, extra):
        return block(hidden_states=image, encoder_hidden_states=text, temb=temb,
                     image_rotary_emb=extra["image_rotary_emb"])


def _dtype(module) -> torch.dtype:
    return next(module.parameters()).dtype
