"""What the flow-matching transformer families (sd3, flux) share: the folder's own
``FlowMatchEulerDiscreteScheduler``, velocity outputs, x0 = x_t - sigma * v, and a one-step
export at sigma = 1.

Conventions (diffusers' ``FlowMatchEulerDiscreteScheduler``): x_sigma = (1 - sigma) x0 +
sigma * noise, the network predicts the velocity v = noise - x0 at the scheduler timestep
t = sigma * T (T = ``num_train_timesteps``, 1000), and an Euler step from sigma to sigma' is
x + (sigma' - sigma) v. So the clean latent implied by an output at sigma is x - sigma * v, and
the generator G (the network on pure noise at sigma = 1) gives x0 = z - v: exactly the Euler
step from sigma = 1 to 0, which is what a stock pipeline does with ``num_inference_steps=1``
(its one sigma is 1 for any ``shift`` and any dynamic-shifting ``mu``).
"""
from __future__ import annotations

import warnings

import torch

from d2g_fast.models import transformer_discriminator
from d2g_fast.teacher.families.base import TeacherFamily

FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"


def calculate_shift(image_seq_len: int, config, default_max_shift: float) -> float:
    """The dynamic-shifting ``mu`` of the pipelines (linear in the number of image tokens)."""
    base_len = config.get("base_image_seq_len", 256)
    max_len = config.get("max_image_seq_len", 4096)
    base_shift = config.get("base_shift", 0.5)
    max_shift = config.get("max_shift", default_max_shift)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)


class FlowFamily(TeacherFamily):
    """Shared by the flow-matching transformer families."""

    denoiser_name = "transformer"
    denoiser_label = "transformer"
    requires_vae = True
    default_scheduler = None
    patch = 2                 # image tokens per latent side: SD3's patch size, FLUX's packing
    default_max_shift = 1.15  # calculate_shift's default in the family's pipeline

    @property
    def latent_channels(self) -> int:
        return int(self.vae_config.get("latent_channels", 16))

    @property
    def latent_shape(self):
        return (self.latent_channels, self.height // self.vae_scale_factor,
                self.width // self.vae_scale_factor)

    def resolution_multiple(self) -> int:
        return self.vae_scale_factor * self.patch

    @property
    def prediction_type(self) -> str:
        return "flow"

    @property
    def num_train_timesteps(self) -> int:
        return int(self.base_scheduler.config.num_train_timesteps)

    @classmethod
    def check_scheduler_name(cls, name: str | None, own: str = FLOW_SCHEDULER) -> None:
        if name not in (None, own, FLOW_SCHEDULER, "flow_euler"):
            raise ValueError(f"scheduler (--scheduler): {cls.name} teachers sample with their "
                             f"own {own} (pass nothing, or {own}); got {name!r}")

    def make_scheduler(self, name: str | None = None):
        """The folder's own flow-matching scheduler (the only sampler of these families)."""
        cls = type(self.base_scheduler)
        self.check_scheduler_name(name, cls.__name__)
        return cls.from_config(self.base_scheduler.config)

    def warn_if_stochastic(self, scheduler_name: str | None):
        if self.make_scheduler(scheduler_name).config.get("stochastic_sampling", False):
            warnings.warn("scheduler: stochastic_sampling draws fresh noise at every step: the "
                          "pairs are reproducible (seeded per batch) but not a deterministic ODE "
                          "map", RuntimeWarning, stacklevel=2)

    # ------------------------------------------------------------------ x0
    def noise_level(self, t) -> float:
        return float(t) / self.num_train_timesteps

    @staticmethod
    def output_to_x0(output, x_t, level, prediction_type: str):
        """x0 = x_t - sigma * v ("flow"), or the output itself ("sample")."""
        if prediction_type == "flow":
            return x_t - level * output
        if prediction_type == "sample":
            return output
        raise ValueError(f"prediction_type: 'flow' or 'sample', got {prediction_type!r}")

    def default_generator_timestep(self):
        return float(self.num_train_timesteps)  # sigma = 1: the start of the flow

    def check_generator_timestep(self, timestep) -> None:
        if float(timestep) != float(self.num_train_timesteps):
            raise ValueError(f"timestep (--timestep): a flow-matching generator starts at sigma "
                             f"= 1 (timestep {self.num_train_timesteps}), the only input the "
                             f"one-step pipeline gives it; got {timestep}")

    # ------------------------------------------------------------------ sampling
    def set_timesteps(self, scheduler, steps: int) -> None:
        """The pipeline's timestep set-up (sigmas, shift, dynamic-shifting mu)."""
        raise NotImplementedError

    def uses_cfg(self, guidance: float) -> bool:
        return guidance > 1.0

    def sample(self, noise, prompts, *, steps=28, guidance=7.0, scheduler=None,
               negative_prompt=None, generator=None, conditioning=None, check_finite=True):
        """The pipeline's multi-step Euler solve from ``noise`` [B, C, h, w] (unpacked) with the
        folder's scheduler; returns float32 latents [B, C, h, w] (unpacked, not VAE-scaled), equal
        to the stock ``output_type="latent"`` result (FLUX: after unpacking)."""
        self._check_sample_args(noise, prompts, steps)
        self.check_sample_options(negative_prompt)
        if scheduler is None or isinstance(scheduler, str):
            scheduler = self.make_scheduler(scheduler)
        guided = self.uses_cfg(guidance)
        embedded = self.guidance_for_generator(guidance)
        with torch.no_grad():
            cond = conditioning or self.encode_prompts(prompts, negative_prompt, guided)
            self.set_timesteps(scheduler, steps)
            latents = noise.to(self.device, torch.float32)
            for t in scheduler.timesteps:
                model_in = torch.cat([latents, latents]) if guided else latents
                out = self.denoise(self._forward, model_in.to(self.dtype), t,
                                   cond.encoder_hidden_states, cond.added_cond_kwargs,
                                   embedded).float()
                if guided:
                    uncond, text = out.chunk(2)
                    out = uncond + guidance * (text - uncond)
                latents = scheduler.step(out, t, latents, generator=generator,
                                         return_dict=False)[0]
        if check_finite:
            self._check_finite(latents, prompts)
        return latents

    def conditioning_from_store(self, prompt_embeds, pooled_prompt_embeds):
        return prompt_embeds, {"pooled_projections": pooled_prompt_embeds}

    # ------------------------------------------------------------------ export
    def export_scheduler(self, prediction_type: str):
        """The folder's scheduler with every option that would move the single sigma away
        from 1 or add noise switched off (terminal shift, inversion, Karras/exponential/beta
        sigmas, stochastic sampling)."""
        return type(self.base_scheduler).from_config(
            self.base_scheduler.config, shift_terminal=None, invert_sigmas=False,
            stochastic_sampling=False, use_karras_sigmas=False, use_exponential_sigmas=False,
            use_beta_sigmas=False)

    def export_check(self, rule: dict) -> None:
        if rule["prediction_type"] == "sample":
            raise ValueError("run_dir: the generator was trained with --parameterization x0; a "
                             "stock flow-matching pipeline applies x - sigma * output to the "
                             "network output, so only --parameterization teacher (velocity) "
                             "students export to a one-step pipeline")
        self.check_generator_timestep(rule["timestep"])

    # ------------------------------------------------------------------ discriminator
    def default_taps(self, net) -> list[int]:
        """The transformer discriminator's rule on ``blocks``: the last block of each quarter
        of the stack, e.g. 5, 11, 17, 23 of 24."""
        return transformer_discriminator.default_taps(len(self.blocks(net)))

    def tokens_to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """Image tokens [B, N, D] (row-major patches, N = (h / 2) (w / 2)) -> [B, D, h/2, w/2]."""
        _, h, w = self.latent_shape
        gh, gw = h // self.patch, w // self.patch
        if tokens.ndim != 3 or tokens.shape[1] != gh * gw:
            raise ValueError(f"tokens: expected [B, {gh * gw}, D] image tokens, got "
                             f"{list(tokens.shape)}")
        return tokens.unflatten(1, (gh, gw)).permute(0, 3, 1, 2)
