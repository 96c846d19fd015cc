"""SD1.5 / SD2.1 (``StableDiffusionPipeline``): one CLIP text encoder, a cross-attention UNet,
epsilon or v prediction. ``UNetFamily`` holds what the UNet families (sd, sdxl) share.

Reproduces the pipeline's ``output_type="latent"`` result (same prompt encoding, same
classifier-free guidance, same scheduler calls) with three differences that only make it faster
or more accurate: the unguided and guided passes are one batched call (as in diffusers); the
negative-prompt embedding is computed once per batch size and reused; the latents and the
scheduler arithmetic stay in float32 while the UNet runs in the compute dtype.

Guidance: classifier-free guidance when ``guidance > 1`` (two passes batched). The exported
one-step student takes ``guidance_scale=1`` (G was distilled from guided samples).
"""
from __future__ import annotations

import inspect

import torch

from d2g_fast.models.discriminator import DiffusionDiscriminator
from d2g_fast.teacher.families.base import Conditioning, TeacherFamily

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# Width of a guidance-conditioned student's guidance embedding (UNet ``time_cond_proj_dim``), as
# in the LCM students diffusers' pipelines already serve.
GUIDANCE_EMBED_DIM = 256


def guidance_embedding(guidance: torch.Tensor, dim: int) -> torch.Tensor:
    """The ``timestep_cond`` [B, dim] float32 a stock StableDiffusion(XL)Pipeline feeds a UNet
    with ``time_cond_proj_dim`` for ``guidance_scale`` g: its own get_guidance_scale_embedding of
    (g - 1), computed as the pipeline does (g - 1 in Python floats, then float32)."""
    from diffusers import StableDiffusionPipeline

    w = (torch.as_tensor(guidance).double() - 1).float().reshape(-1)
    # The method does not read ``self``.
    return StableDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)


def add_cond_proj(unet) -> None:
    """A UNet's guidance input (G's, and the UNet D's): diffusers' own (LCM's)
    ``time_embedding.cond_proj``, a bias-free linear map of the guidance embedding added to the
    timestep embedding, zero-initialised, and ``time_cond_proj_dim`` in the config (so the stock
    pipeline feeds ``timestep_cond`` from its ``guidance_scale`` and does not double the
    batch)."""
    from torch import nn

    emb = unet.time_embedding
    if getattr(emb, "cond_proj", None) is not None:
        return
    ref = emb.linear_1.weight
    emb.cond_proj = nn.Linear(GUIDANCE_EMBED_DIM, emb.linear_1.in_features, bias=False,
                              device=ref.device, dtype=ref.dtype)
    nn.init.zeros_(emb.cond_proj.weight)
    emb.cond_proj.weight.requires_grad_(ref.requires_grad)
    unet.register_to_config(time_cond_proj_dim=GUIDANCE_EMBED_DIM)


def unet_to_x0(output, noise, alpha_bar, prediction_type: str):
    """The clean latent implied by a UNet ``output`` on input ``noise`` at a timestep whose
    cumulative alpha is ``alpha_bar`` (a 0-d tensor): DDIM's ``pred_original_sample``."""
    if prediction_type == "epsilon":
        return (noise - (1 - alpha_bar).sqrt() * output) / alpha_bar.sqrt()
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * output
    if prediction_type == "sample":
        return output
    raise ValueError(f"prediction_type: one of {PREDICTION_TYPES}, got {prediction_type!r}")


class UNetFamily(TeacherFamily):
    """Shared by the UNet (DDPM-trained) families."""

    denoiser_name = "unet"
    default_scheduler = "ddim"

    def check_components(self) -> None:
        unet = self.unet
        if getattr(unet.config, "time_cond_proj_dim", None) is not None:
            raise ValueError("unet: guidance-embedded UNets (time_cond_proj_dim, e.g. LCM) are "
                             "not supported as teachers")
        if self.vae_config and self.vae_config.get("latent_channels", unet.config.in_channels) \
                != unet.config.in_channels:
            raise ValueError(f"vae_config: latent_channels {self.vae_config['latent_channels']} "
                             f"differs from the UNet's in_channels {unet.config.in_channels}")

    def default_resolution(self):
        sample = self.unet.config.sample_size
        sample = (sample, sample) if isinstance(sample, int) else tuple(sample)
        return sample[0] * self.vae_scale_factor, sample[1] * self.vae_scale_factor

    @property
    def latent_shape(self):
        return (int(self.unet.config.in_channels), self.height // self.vae_scale_factor,
                self.width // self.vae_scale_factor)

    @property
    def prediction_type(self) -> str:
        return self.base_scheduler.config.get("prediction_type", "epsilon")

    @property
    def _unet_forward(self):
        """The UNet forward in use (eager, compiled or CUDA-graphed); older name of _forward."""
        return self._forward

    def _enable_cuda_graphs(self) -> None:
        from d2g_fast.teacher.cuda_graph import GraphedUNet

        self._forward = GraphedUNet(self.unet)

    # ------------------------------------------------------------------ network and x0
    @classmethod
    def denoise(cls, net, x, t, encoder_hidden_states, added_cond_kwargs=None, guidance=None):
        extra = {}
        dim = getattr(net.config, "time_cond_proj_dim", None)
        if dim is not None and guidance is not None:  # a guidance-conditioned student
            cond = guidance_embedding(guidance, dim).to(x.device)
            extra["timestep_cond"] = cond.expand(x.shape[0], -1).to(x.dtype)
        return net(x, t, encoder_hidden_states=encoder_hidden_states,
                   added_cond_kwargs=added_cond_kwargs, return_dict=False, **extra)[0]

    def add_guidance_input(self, net) -> None:
        """diffusers' own guidance input, ``time_embedding.cond_proj`` (:func:`add_cond_proj`)."""
        add_cond_proj(net)

    def noise_level(self, t) -> float:
        return float(self.base_scheduler.alphas_cumprod[int(t)])

    @staticmethod
    def output_to_x0(output, x_t, level, prediction_type: str):
        return unet_to_x0(output, x_t, level, prediction_type)

    def default_generator_timestep(self):
        return int(self.base_scheduler.config.num_train_timesteps) - 1

    def check_generator_timestep(self, timestep) -> None:
        last = int(self.base_scheduler.config.num_train_timesteps) - 1
        if not isinstance(timestep, int) or not 0 <= timestep <= last:
            raise ValueError(f"timestep (--timestep): must be in [0, {last}], got {timestep}")

    # ------------------------------------------------------------------ sampling
    def sample(self, noise, prompts, *, steps=50, guidance=7.5, scheduler=None,
               negative_prompt=None, generator=None, conditioning=None, check_finite=True):
        """Run the sampler from ``noise`` [B, C, h, w] for ``prompts`` and return the final
        latents [B, C, h, w] in float32 on the teacher's device (NOT divided by the VAE scaling
        factor: exactly the pipeline's ``output_type="latent"`` result).

        Classifier-free guidance when ``guidance > 1`` (the diffusers rule), both halves in one
        batched UNet call. ``scheduler`` is a diffusers scheduler instance or name (default DDIM
        from the teacher's config); its state is reset here. Raises NonFiniteLatentError when
        the result holds NaN or Inf."""
        self._check_sample_args(noise, prompts, steps)
        if scheduler is None or isinstance(scheduler, str):
            scheduler = self.make_scheduler(scheduler)
        guided = guidance > 1.0
        with torch.no_grad():
            cond = conditioning or self.encode_prompts(prompts, negative_prompt, guided)
            latents = self._solve(noise, cond, steps, guidance, guided, scheduler, generator)
        if check_finite:
            self._check_finite(latents, prompts)
        return latents

    def _solve(self, noise, cond, steps, guidance, guided, scheduler, generator):
        scheduler.set_timesteps(steps, device=self.device)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        step_params = inspect.signature(scheduler.step).parameters
        extra = {}
        if "eta" in step_params:
            extra["eta"] = 0.0
        if "generator" in step_params:
            extra["generator"] = generator
        memory_format = torch.channels_last if self._channels_last else torch.contiguous_format
        latents = noise.to(self.device, torch.float32) * scheduler.init_noise_sigma
        # DDIM indexes its CPU tables with the timestep and branches on it: given the device
        # tensor that costs a host-device synchronisation per step; a Python int does not, and
        # gives the same numbers.
        host_steps = [int(t) for t in scheduler.timesteps.cpu()] \
            if type(scheduler).__name__ == "DDIMScheduler" else list(scheduler.timesteps)
        for t, t_step in zip(scheduler.timesteps, host_steps):
            model_in = torch.cat([latents, latents]) if guided else latents
            model_in = scheduler.scale_model_input(model_in, t)
            model_in = model_in.to(self.dtype).contiguous(memory_format=memory_format)
            out = self.denoise(self._forward, model_in, t, cond.encoder_hidden_states,
                               cond.added_cond_kwargs).float()
            if guided:
                uncond, text = out.chunk(2)
                out = uncond + guidance * (text - uncond)
            latents = scheduler.step(out, t_step, latents, **extra, return_dict=False)[0]
        return latents

    # ------------------------------------------------------------------ export
    def export_scheduler(self, prediction_type: str):
        """DDIM with ``timestep_spacing="trailing"`` (one step evaluates the UNet at the last
        training timestep, G's default) and ``set_alpha_to_one=True`` (the step goes to
        alpha = 1, so DDIM returns its ``pred_original_sample``: G's x0 formula)."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.base_scheduler.config,
                                         timestep_spacing="trailing", set_alpha_to_one=True,
                                         prediction_type=prediction_type, clip_sample=False,
                                         thresholding=False, rescale_betas_zero_snr=False)

    def export_check(self, rule: dict) -> None:
        last = int(self.base_scheduler.config.num_train_timesteps) - 1
        if rule["timestep"] != last:
            raise ValueError(f"run_dir: the generator was trained at timestep "
                             f"{rule['timestep']}; diffusers' one-step schedule evaluates the "
                             f"UNet at {last} only, so only students trained at the default "
                             f"--timestep export to a pipeline")

    @classmethod
    def pipeline_latent_shape(cls, pipe, height, width):
        f = int(pipe.vae_scale_factor)
        return int(pipe.unet.config.in_channels), height // f, width // f

    @classmethod
    def pipeline_default_size(cls, pipe) -> int:
        return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)

    # ------------------------------------------------------------------ discriminator
    @classmethod
    def discriminator_class(cls) -> type:
        """The paper's UNet discriminator."""
        return DiffusionDiscriminator

    def blocks(self, net) -> list:
        return list(net.down_blocks) + [net.mid_block] + list(net.up_blocks)

    def default_taps(self, net) -> list[int]:
        """The decoder (up) blocks: the UNet discriminator's multi-scale readouts."""
        first_up = len(net.down_blocks) + 1
        return list(range(first_up, first_up + len(net.up_blocks)))

    def tokens_to_grid(self, tokens):
        raise NotImplementedError("UNet features are grids already")

    # ------------------------------------------------------------------ prompts (shared)
    def _encode_guided(self, prompts, negative_prompt, guided, zeros_for_empty: bool):
        n = len(prompts)
        embeds, pooled = self._encode(list(prompts))
        embeds = embeds.to(self.dtype)
        pooled = pooled.to(self.dtype) if pooled is not None else None
        if not guided:
            return Conditioning(embeds, self._added(pooled, n), embeds, pooled)
        # Encoded at the batch size (cached per size): a batch of one can round differently
        # in the text projection, and we want the pipeline's numbers.
        key = (negative_prompt, n, embeds.shape[1], self.device, self.dtype)
        if key not in self._negative_cache:
            if negative_prompt is None and zeros_for_empty:
                neg = torch.zeros_like(embeds)
                neg_pooled = torch.zeros_like(pooled) if pooled is not None else None
            else:
                neg, neg_pooled = self._encode([negative_prompt or ""] * n,
                                               max_length=embeds.shape[1])
                neg = neg.to(self.dtype)
                neg_pooled = neg_pooled.to(self.dtype) if neg_pooled is not None else None
            self._negative_cache[key] = (neg, neg_pooled)
        neg, neg_pooled = self._negative_cache[key]
        added = None
        if pooled is not None:
            added = self._added(torch.cat([neg_pooled, pooled]), 2 * n)
        return Conditioning(torch.cat([neg, embeds]), added, embeds, pooled)

    def _added(self, pooled, n):
        return None


class SDFamily(UNetFamily):
    """``StableDiffusionPipeline`` teachers (SD1.5, SD2.1)."""

    name = "sd"
    pipeline_classes = ("StableDiffusionPipeline",)
    text_pairs = (("tokenizer", "text_encoder"),)
    lpips_encoder = "sd15"
    stores_pooled = False

    def _encode(self, texts, max_length=None):
        tok, enc = self.tokenizer, self.text_encoder
        inputs = tok(texts, padding="max_length", max_length=max_length or tok.model_max_length,
                     truncation=True, return_tensors="pt")
        mask = None
        if getattr(enc.config, "use_attention_mask", False):
            mask = inputs.attention_mask.to(self.device)
        return enc(inputs.input_ids.to(self.device), attention_mask=mask)[0], None

    @torch.no_grad()
    def encode_prompts(self, prompts, negative_prompt=None, guided=True) -> Conditioning:
        """As ``StableDiffusionPipeline.encode_prompt``: padded/truncated to the tokenizer
        limit, last hidden states; the negative prompt (default "") encoded when guided."""
        return self._encode_guided(prompts, negative_prompt, guided, zeros_for_empty=False)

    def conditioning_from_store(self, prompt_embeds, pooled_prompt_embeds):
        return prompt_embeds, None
