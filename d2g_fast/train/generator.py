"""The one-step generator G(z, c): a copy of the teacher UNet evaluated once at a fixed timestep.

G's UNet sees pure noise z at timestep t (default the teacher's last training timestep) and
its output is turned into a clean latent x0:

    prediction_type "epsilon":       x0 = (z - sqrt(1 - a_t) * eps) / sqrt(a_t)
    prediction_type "v_prediction":  x0 = sqrt(a_t) * z - sqrt(1 - a_t) * v
    prediction_type "sample":        x0 = output

with a_t the teacher scheduler's alphas_cumprod[t]. With ``parameterization="x0"`` the UNet is
trained to output x0 itself (whatever the teacher predicted). These are exactly the formulas of
diffusers' DDIMScheduler.step for a step from t to "alpha = 1", which is what makes the exported
one-step pipeline reproduce G (see d2g_fast.train.export).
"""
from __future__ import annotations

import torch
from torch import nn

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def to_x0(output: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor,
          prediction_type: str) -> torch.Tensor:
    """The clean latent implied by a UNet ``output`` on input ``noise`` at a timestep whose
    cumulative alpha is ``alpha_bar`` (a 0-d tensor). Shapes: output, noise [B, C, h, w]."""
    if prediction_type == "epsilon":
        return (noise - (1 - alpha_bar).sqrt() * output) / alpha_bar.sqrt()
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * output
    if prediction_type == "sample":
        return output
    raise ValueError(f"prediction_type: one of {PREDICTION_TYPES}, got {prediction_type!r}")


class OneStepGenerator(nn.Module):
    """G(z, c) -> x0 [B, C, h, w] (float32), for noise z [B, C, h, w] and text conditioning.

    Args:
        unet: the generator's own ``UNet2DConditionModel`` (trained in place).
        alphas_cumprod: the teacher scheduler's cumulative alphas [T].
        timestep: the fixed input timestep.
        prediction_type: how the UNet output is read: the teacher's type for
            ``parameterization="teacher"``, "sample" for ``parameterization="x0"``.
    """

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, timestep: int,
                 prediction_type: str):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type: one of {PREDICTION_TYPES}, got "
                             f"{prediction_type!r}")
        if not 0 <= timestep < len(alphas_cumprod):
            raise ValueError(f"timestep (--timestep): must be in [0, {len(alphas_cumprod) - 1}], "
                             f"got {timestep}")
        self.unet = unet
        self.timestep = int(timestep)
        self.prediction_type = prediction_type
        # float64 scalar as the scheduler holds it; moved with the module but never trained.
        self.register_buffer("alpha_bar", alphas_cumprod[self.timestep].detach().clone()
                             .to(torch.float32), persistent=False)

    def forward(self, noise: torch.Tensor, encoder_hidden_states: torch.Tensor,
                added_cond_kwargs: dict | None = None) -> torch.Tensor:
        dtype = next(self.unet.parameters()).dtype
        t = torch.full((noise.shape[0],), self.timestep, device=noise.device, dtype=torch.long)
        out = self.unet(noise.to(dtype), t, encoder_hidden_states=encoder_hidden_states,
                        added_cond_kwargs=added_cond_kwargs, return_dict=False)[0]
        return to_x0(out.float(), noise.float(), self.alpha_bar, self.prediction_type)


def generator_prediction_type(teacher_prediction_type: str, parameterization: str) -> str:
    """The prediction_type G's UNet is read with (and exported with)."""
    return "sample" if parameterization == "x0" else teacher_prediction_type
