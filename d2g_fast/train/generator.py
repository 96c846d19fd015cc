"""The one-step generator G(z, c): a copy of the teacher's network evaluated once at a fixed
timestep, its output turned into a clean latent x0 by the teacher family's own rule.

UNet teachers (sd, sdxl): G's UNet sees pure noise z at timestep t (default the teacher's last
training timestep) and

    prediction_type "epsilon":       x0 = (z - sqrt(1 - a_t) * eps) / sqrt(a_t)
    prediction_type "v_prediction":  x0 = sqrt(a_t) * z - sqrt(1 - a_t) * v
    prediction_type "sample":        x0 = output

with a_t the teacher scheduler's alphas_cumprod[t]: DDIM's ``pred_original_sample``.

Flow-matching transformers (sd3, flux): G's transformer sees z at the start of the flow
(sigma = 1, timestep T = 1000) and its velocity v becomes x0 = z - sigma * v = z - v, the
scheduler's own Euler step from sigma = 1 to 0; FLUX-dev's guidance embedding gets the
collection guidance. So G starts as the teacher's one-step prediction, and the stock pipeline
with ``num_inference_steps=1`` computes exactly G (d2g_fast.train.export).

With ``parameterization="x0"`` the network is trained to output x0 itself (whatever the teacher
predicted): exportable for UNets (DDIM with prediction_type "sample"), not for flow models (a
stock flow-matching pipeline always applies x - sigma * output).

The per-family rules live in :mod:`d2g_fast.teacher.families` (``denoise``, ``output_to_x0``,
``one_step_rule``); this module only holds them together with the trainable network.
"""
from __future__ import annotations

import torch
from torch import nn

from d2g_fast.teacher.families import OneStepRule, family_class
from d2g_fast.teacher.families.sd import PREDICTION_TYPES, unet_to_x0


def to_x0(output: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor,
          prediction_type: str) -> torch.Tensor:
    """UNet rule (kept for existing callers): see ``families.sd.unet_to_x0``."""
    return unet_to_x0(output, noise, alpha_bar, prediction_type)


class OneStepGenerator(nn.Module):
    """G(z, c) -> x0 [B, C, h, w] (float32), for noise z [B, C, h, w] (unpacked latents) and the
    text conditioning (encoder_hidden_states, added_cond_kwargs) of the teacher family.

    Args:
        net: G's own network (a UNet or a transformer; trained in place). It is registered as
            ``unet`` whatever its kind so that checkpoints and FSDP units keep their layout
            (``net`` is an alias).
        rule: :class:`~d2g_fast.teacher.families.OneStepRule` from ``teacher.one_step_rule``.
        guidance_set: the pairs' guidance set when they were collected over several scales
            (``{"values": [...]}`` or ``{"range": [low, high]}``): G is guidance-conditioned
            and reads each row's scale from ``added_cond_kwargs["guidance"]`` ([B]); rows
            without one get ``default_guidance`` (the middle of the set).
    """

    def __init__(self, net: nn.Module, rule: OneStepRule, guidance_set: dict | None = None):
        super().__init__()
        self.family = family_class(rule.family)
        self.rule = rule
        self.guidance_set = guidance_set
        self.default_guidance = middle_guidance(guidance_set)
        self.unet = net
        # float32 as the scheduler holds it; moved with the module but never trained.
        self.register_buffer("level", torch.tensor(rule.level, dtype=torch.float32),
                             persistent=False)

    @property
    def net(self) -> nn.Module:
        return self.unet

    @property
    def timestep(self):
        return self.rule.timestep

    @property
    def prediction_type(self) -> str:
        return self.rule.prediction_type

    def describe(self) -> dict:
        """What a checkpoint records about G (the export reads it back)."""
        out = {"family": self.rule.family, "timestep": self.rule.timestep,
               "prediction_type": self.rule.prediction_type, "guidance": self.rule.guidance}
        if self.guidance_conditioned:
            out["guidance_set"] = self.guidance_set
        return out

    @property
    def guidance_conditioned(self) -> bool:
        return self.guidance_set is not None

    def _guidance(self, added: dict | None, batch: int, device) -> tuple:
        """(the guidance G's network gets, added_cond_kwargs without it)."""
        if not self.guidance_conditioned:
            return self.rule.guidance, added
        added = dict(added or {})
        guidance = added.pop("guidance", None)
        if guidance is None:
            guidance = torch.full((batch,), self.default_guidance, dtype=torch.float32)
        return guidance.to(device, torch.float32), (added or None)

    def forward(self, noise: torch.Tensor, encoder_hidden_states: torch.Tensor,
                added_cond_kwargs: dict | None = None) -> torch.Tensor:
        dtype = next(self.unet.parameters()).dtype
        t = torch.full((noise.shape[0],), self.rule.timestep, device=noise.device,
                       dtype=torch.long if isinstance(self.rule.timestep, int) else torch.float32)
        guidance, added_cond_kwargs = self._guidance(added_cond_kwargs, noise.shape[0],
                                                     noise.device)
        out = self.family.denoise(self.unet, noise.to(dtype), t, encoder_hidden_states,
                                  added_cond_kwargs, guidance)
        return self.family.output_to_x0(out.float(), noise.float(), self.level,
                                        self.rule.prediction_type)


def middle_guidance(guidance_set: dict | None) -> float | None:
    """The scale in the middle of a guidance set (the median value, or the range's midpoint)."""
    if not guidance_set:
        return None
    if "range" in guidance_set:
        return float(sum(guidance_set["range"]) / 2)
    values = sorted(guidance_set["values"])
    return float(values[(len(values) - 1) // 2])


def make_generator(teacher, *, timestep=None, parameterization: str = "teacher",
                   guidance: float | None = None, guidance_set: dict | None = None,
                   gradient_checkpointing: bool = False) -> OneStepGenerator:
    """G from a teacher family instance: a float32, trainable deep copy of its network with the
    family's one-step rule. ``guidance`` is the pairs' collection guidance (used by families
    with a guidance embedding, FLUX-dev); ``guidance_set`` (pairs collected over several
    scales) makes G guidance-conditioned through the family's zero-initialised guidance input,
    so that it starts as the teacher's one-step prediction."""
    import copy

    rule = teacher.one_step_rule(timestep, parameterization,
                                 middle_guidance(guidance_set) if guidance_set else guidance)
    net = copy.deepcopy(teacher.denoiser).float().train().requires_grad_(True)
    if guidance_set:
        teacher.add_guidance_input(net)
    if gradient_checkpointing:
        net.enable_gradient_checkpointing()
    return OneStepGenerator(net, rule, guidance_set)


def generator_prediction_type(teacher_prediction_type: str, parameterization: str) -> str:
    """The prediction_type G's network is read with (and exported with)."""
    return "sample" if parameterization == "x0" else teacher_prediction_type


__all__ = ["OneStepGenerator", "make_generator", "to_x0", "generator_prediction_type",
           "PREDICTION_TYPES"]
