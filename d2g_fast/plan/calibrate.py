"""Calibrating and checking the plan against measured CPU peaks of small real runs.

``shaped(width, latent)`` makes SD-shaped teachers small enough to train on a CPU (two UNet
levels of ``width`` and ``2 * width`` channels, ``latent`` x ``latent`` latents), so that the
activations, not the weights, dominate the step. ``compare`` builds the REAL run of a case,
measures its R1 step with the profiler (:mod:`d2g_fast.plan.measure`) and puts the plan's
prediction for the same case beside it. ``ACTIVATION_FIT`` of the planner is the least-squares
ratio measured/simulated over ``CALIBRATION_CASES``; tests check the other cases.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def shaped(width: int, latent: int):
    """A callable ``(device) -> components`` of a small SD-shaped teacher."""
    def components(device):
        from diffusers import UNet2DConditionModel

        from d2g_fast.testing.tiny import tiny_sd_components

        comps = tiny_sd_components()
        cross = comps["text_encoder"].config.hidden_size
        torch.manual_seed(0)
        with torch.device(device):
            comps["unet"] = UNet2DConditionModel(
                block_out_channels=(width, 2 * width), layers_per_block=1, sample_size=latent,
                in_channels=4, out_channels=4,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross,
                attention_head_dim=8, norm_num_groups=math.gcd(32, width)).eval()
        for name in ("text_encoder", "vae"):
            comps[name] = comps[name].to(device)
        return comps
    components.__name__ = f"sd-shaped w{width} {latent}x{latent}"
    return components


def flow_shaped(family: str, heads: int, latent: int):
    """A callable ``(device) -> teacher`` of a tiny SD3- or FLUX-shaped teacher
    (:mod:`d2g_fast.testing.tiny`, ``heads`` attention heads of 16 channels) at ``latent`` x
    ``latent`` latents (16 channels; the tiny VAE's factor 2)."""
    def teacher(device):
        from d2g_fast.bench import archs
        from d2g_fast.testing import tiny

        arch = {"sd3": "tiny-sd3", "flux": "tiny-flux"}[family]
        if family == "sd3":
            comps = tiny.tiny_sd3_components(sample_size=latent, num_heads=heads, head_dim=16)
        else:
            comps = tiny.tiny_flux_components(num_heads=heads, head_dim=16,
                                              axes_dims_rope=(4, 6, 6))
        pipe = archs.pipeline_class(arch)(**comps)
        from d2g_fast.teacher.families import family_for_pipeline

        made = family_for_pipeline(pipe).from_pipeline(pipe, resolution=2 * latent)
        return made.to(device=device)
    teacher.__name__ = f"{family}-shaped {heads} heads {latent}x{latent}"
    return teacher


@dataclass(frozen=True)
class Case:
    width: int          # UNet: the first level's channels; sd3/flux: attention heads (x16)
    latent: int
    batch: int
    precision: str = "fp32"
    checkpointing: bool = False
    family: str = "sd"  # "sd" (an SD-shaped UNet), "sd3" or "flux" (tiny transformers)
    lora_rank: int = 0  # a LoRA student of this rank (0: full G)
    light_d: bool = False  # the light D (d2g distill --light-d)

    def __str__(self):
        size = f"w{self.width}" if self.family == "sd" else f"{self.family} h{self.width}"
        return (f"{size} {self.latent}x{self.latent} B{self.batch} {self.precision}"
                f"{' ckpt' if self.checkpointing else ''}"
                f"{f' lora{self.lora_rank}' if self.lora_rank else ''}"
                f"{' light-d' if self.light_d else ''}")

    def source(self):
        if self.family == "sd":
            return shaped(self.width, self.latent)
        return flow_shaped(self.family, self.width, self.latent)


CALIBRATION_CASES = (Case(32, 16, 2), Case(32, 16, 4), Case(32, 16, 2, "bf16"),
                     Case(32, 16, 4, checkpointing=True))
"""The cases ACTIVATION_FIT was fitted on."""

VALIDATION_CASES = (Case(48, 24, 3), Case(32, 32, 1, "bf16"),
                    Case(64, 16, 5, "bf16", True), Case(48, 32, 2, checkpointing=True),
                    Case(2, 8, 2, family="flux"), Case(2, 8, 3, family="sd3"),
                    Case(32, 16, 3, lora_rank=4),
                    Case(4, 16, 3, family="flux"), Case(4, 16, 2, "bf16", True, family="sd3"),
                    Case(3, 16, 2, family="flux", lora_rank=4), Case(48, 24, 2, lora_rank=8),
                    Case(32, 16, 3, light_d=True), Case(48, 24, 2, lora_rank=8, light_d=True))
"""Other widths, latent sizes, batch sizes, the SD3/FLUX transformer families, the light D and LoRA
students: the plan must match these within 15 %."""


def _request(case: Case):
    from d2g_fast.plan.planner import PlanRequest

    options = {"lora_rank": case.lora_rank} if case.lora_rank else {}
    if case.light_d:
        options["light_d"] = True
    return PlanRequest(case.source(), batch_size=case.batch, gpus=1, gpu_memory_gb=1e6,
                       precision=case.precision, gradient_checkpointing=case.checkpointing,
                       device="cpu", options=options)


def predict(case: Case):
    """The plan of ``case`` (simulated only, nothing measured)."""
    from d2g_fast.plan.planner import plan, simulate

    req = _request(case)
    timeline, state, counts = simulate(req)
    return plan(req, timeline=timeline, state=state, counts=counts, max_batch=1)


def compare(case: Case) -> dict:
    """Measured (real CPU run) and predicted bytes of ``case``: persistent state, step peak
    above it, and their sum; ``error`` is predicted/measured - 1 of the sum."""
    from d2g_fast.plan.measure import measure_step
    from d2g_fast.plan.fake import portable_trunk
    from d2g_fast.plan.planner import _persistent_rows, plan, simulate

    req = _request(case)
    with portable_trunk():
        measured = measure_step(req.source, req.train_config(), case.batch)
    timeline, state, _ = simulate(req)
    p = plan(req, timeline=timeline, state=state, max_batch=1)
    persistent = sum(b for _, b in _persistent_rows(req, state))
    predicted = {"persistent": persistent, "step_peak": p.peak - persistent, "total": p.peak}
    labels = timeline.peak(case.batch)
    return {"case": str(case), "measured": measured, "predicted": predicted,
            "simulated_step": sum(labels.values()), "simulated_gradients": labels["gradients"],
            "error": predicted["total"] / measured["total"] - 1.0,
            "step_error": predicted["step_peak"] / measured["step_peak"] - 1.0}


def fit(results: list[dict]) -> float:
    """Least-squares factor k of the activations: minimises the sum over cases of
    (measured_step - gradients - k * (simulated_step - gradients))^2 (gradients are exact)."""
    pairs = [(r["measured"]["step_peak"] - r["simulated_gradients"],
              r["simulated_step"] - r["simulated_gradients"]) for r in results]
    return sum(m * s for m, s in pairs) / sum(s * s for _, s in pairs)


def fit_by_checkpointing(cases, results) -> dict:
    """:func:`fit` over the cases without and with gradient checkpointing separately."""
    return {flag: fit([r for c, r in zip(cases, results) if c.checkpointing == flag])
            for flag in (False, True)
            if any(c.checkpointing == flag for c in cases)}


def table(results: list[dict]) -> str:
    mib = 2 ** 20
    lines = ["| case | measured persistent MiB | measured step MiB | measured total MiB | "
             "predicted total MiB | error total | error step |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        m, p = r["measured"], r["predicted"]
        lines.append(f"| {r['case']} | {m['persistent'] / mib:.1f} | {m['step_peak'] / mib:.1f} "
                     f"| {m['total'] / mib:.1f} | {p['total'] / mib:.1f} | "
                     f"{100 * r['error']:+.1f} % | {100 * r['step_error']:+.1f} % |")
    return "\n".join(lines)
