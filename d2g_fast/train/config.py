"""The distillation run's configuration: one dataclass, a documented default for every field.

Sources, later ones winning: the dataclass defaults, a config file (``--config``: JSON, TOML or
YAML holding a flat mapping of field names), then the command-line flags the user actually gave.
The resolved configuration is written to ``RUN_DIR/config.json`` and stored in every checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, fields

PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
PARAMETERIZATIONS = ("teacher", "x0")
AUGMENT_NONE = "none"


@dataclass
class TrainConfig:
    """Every setting of a ``d2g distill`` run (flag ``--foo-bar`` sets field ``foo_bar``)."""

    # ---- inputs and outputs
    teacher: str = ""
    """Local diffusers folder of the teacher (the pairs' teacher: its identity is checked)."""
    pairs: str = ""
    """Pair store folder written by ``d2g collect``."""
    out: str = ""
    """Run folder: config.json, metrics.csv, checkpoints/, samples/."""

    # ---- the generator G(z, c)
    timestep: int | None = None
    """Input timestep of the one-step generator. None: the teacher's last training timestep
    (999 for SD), where its input distribution is pure noise, exactly what G receives."""
    parameterization: str = "teacher"
    """"teacher": the UNet keeps the teacher's prediction_type (epsilon, v_prediction or sample)
    and its output is converted to x0 at ``timestep``. Default, because G then starts as the
    teacher's own one-step prediction, the best available initialisation. "x0": the UNet is
    trained to output x0 directly (exports with prediction_type "sample")."""

    # ---- optimisation
    max_steps: int = 1000
    """Optimiser steps (each: one G step and one D step on a global batch)."""
    batch_size: int = 8
    """Micro-batch per process (diffusers' per-device convention). The global batch is
    batch_size x processes x grad_accum; results depend on the global batch and the micro-batch
    size, not on how micro-batches are spread over processes."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimiser step and process."""
    lr_g: float = 5e-6
    """AdamW learning rate of G."""
    lr_d: float = 5e-6
    """AdamW learning rate of D."""
    betas_g: tuple[float, float] = (0.0, 0.99)
    """AdamW betas of G (beta1 = 0 is the usual GAN choice)."""
    betas_d: tuple[float, float] = (0.0, 0.99)
    """AdamW betas of D."""
    weight_decay: float = 0.0
    """AdamW weight decay (both networks)."""
    grad_clip: float = 1.0
    """Clip G's and D's gradient norm to this (0: no clipping)."""
    lambda_gan: float = 0.5
    """Weight of the GAN loss in G's loss (0: regression only, the paper's ablation)."""
    warmup_steps: int = 0
    """Regression-only steps for G at the start (D trains from step 0 so that it is not random
    when the GAN loss switches on)."""
    ema_decay: float = 0.999
    """EMA of G's weights (0: no EMA; export and samples then use G)."""

    # ---- discriminator and losses
    r1_gamma: float = 1.0
    """Single-sample lazy R1 strength (0: off)."""
    r1_interval: int = 16
    """R1 every this many steps (scaled by the interval, StyleGAN2's lazy regularisation)."""
    mix_fraction: float = 0.25
    """Fraction of D's negatives replaced by mismatched real latents (mix-and-match)."""
    d_taps: list[int] = field(default_factory=list)
    """Transformer teachers (SD3, FLUX): the blocks whose image tokens D's heads read, as
    indices into the teacher family's blocks (FLUX: the double blocks, then the single blocks).
    Empty: the family's default, the last block of each quarter (SD3-medium 5 11 17 23, FLUX.1
    13 27 41 56). Ignored for UNet teachers (their D reads every decoder scale)."""
    d_noise_off: bool = False
    """D without its noise conditioning z (no zero-initialised noise conv): the paper's ablation
    row "+ diffusion D" (d2g toy ablate)."""
    d_multiscale_input_off: bool = False
    """D without the resized latent entering its down blocks (multi-scale input off)."""
    d_multiscale_output_off: bool = False
    """D with one readout head (the last decoder scale) instead of the multi-scale heads."""
    regression_loss: str = "e_latentlpips"
    """G's regression loss: e_latentlpips (with --augment; "none" makes it LatentLPIPS), mse,
    pseudo_huber or pixel_lpips (LPIPS-VGG with a random trunk on VAE decodings; see
    d2g_fast.losses.regression). The paper's loss ablation."""
    augment: str = "bg"
    """E-LatentLPIPS augmentation preset (b, g, c, o, co, bg, bgc, bgco) or "none"."""
    lpips_dir: str | None = None
    """Folder with the official E-LatentLPIPS files (default: $D2G_ELATENTLPIPS_DIR)."""
    lpips_path: str | None = None
    """One E-LatentLPIPS weights file the package loads (our safetensors or the official tuned
    .pth), instead of --lpips-dir."""
    lpips_random: bool = False
    """Random E-LatentLPIPS trunk and heads (tests and toys only: not a perceptual loss)."""
    lpips_encoder: str | None = None
    """E-LatentLPIPS encoder name (sd15, sd21, sdxl, ...); default from the teacher kind."""

    # ---- speed and memory
    precision: str = "fp32"
    """"bf16": autocast G, D and E-LatentLPIPS in bfloat16 (weights and optimiser stay fp32)."""
    gradient_checkpointing: bool = False
    """Recompute G's and D's activations in the backward pass (less memory, ~30 % more time)."""
    compile: bool = False
    """torch.compile G's forward."""
    fsdp: bool = False
    """Shard G, D and their optimiser states over the processes (FSDP2 fully_shard) instead of
    replicating them; for models whose training state does not fit one device (SDXL)."""
    num_workers: int = 0
    """DataLoader worker processes reading the pair store."""
    overlap_phases: bool = False
    """CPU: after G's forward, run G's loss and backward beside D's step on a second thread,
    each phase with half of torch's threads (R1 steps run them one after the other). Small
    networks' kernels scale poorly over cores and the two phases are independent (the toy
    demo's step: benchmarks/RESULTS.md). The math is the sequential order's (both phases
    read D's weights from before the step); rounding differs, as each kernel runs on fewer
    threads. Needs >= 2 threads; not with --fsdp, --gradient-checkpointing (its recomputation
    resets the random state the other phase draws from) or --light-d with --lora-rank (D then
    switches G's adapters off and on)."""
    lora_rank: int = 0
    """Train G as a LoRA student of this rank (0: train every weight of G). The teacher's
    weights stay frozen; only the adapters (and a guidance input G adds) are trained, averaged
    into the EMA and checkpointed (d2g_fast.train.lora)."""
    lora_alpha: float = 0.0
    """LoRA alpha (the adapters' output is scaled by alpha / rank); 0: equal to the rank."""
    lora_targets: list[str] = field(default_factory=list)
    """Module names the adapters wrap (peft target_modules). Empty: the attention projections
    to_q to_k to_v to_out.0, as diffusers' LoRA training scripts use; the same names exist in
    UNets and SD3/FLUX transformers. Add conv1 conv2 (UNet resnets) or ff.net.0.proj ff.net.2
    (feed-forward) for more capacity at a larger adapter."""
    light_d: bool = False
    """A light discriminator: D's backbone frozen at the teacher's weights (no gradients, no
    optimiser state), only its z-conditioning, multi-scale input convs, heads (and guidance
    input) trained and checkpointed. With --lora-rank D runs G's own frozen base with the
    adapters switched off (one copy of the teacher's network; not with --fsdp on several
    processes). See d2g_fast.models.light_discriminator."""

    # ---- checkpoints, logs, samples
    checkpoint_every: int = 500
    """Write a full checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 3
    """Keep the newest this many checkpoints (0: keep all)."""
    resume: str = "auto"
    """"auto": continue from the newest complete checkpoint in out/checkpoints (start fresh if
    none); "none": start fresh (refused if the run folder has checkpoints); or a checkpoint
    folder."""
    log_every: int = 10
    """Append a metrics.csv row every this many steps."""
    val_pairs: int = 0
    """Hold out the last this many pairs of the store; their E-LatentLPIPS (no augmentation) is
    logged as val_e_latentlpips at every logged step."""
    sample_every: int = 0
    """Write a PNG grid of (EMA) samples every this many steps (0: never); needs the teacher's
    VAE weights."""
    sample_prompts: list[str] = field(default_factory=list)
    """Prompts of the sample grid (default: the first 8 of the store)."""
    max_nonfinite: int = 20
    """Abort after this many consecutive steps with a NaN/Inf loss (each such step is skipped)."""
    progress: bool = True
    """Show a progress bar (rank 0)."""

    # ---- reproducibility and devices
    seed: int = 0
    """Seeds the data order, the augmentation draws and mix-and-match of every micro-batch."""
    device: str = "auto"
    """"auto": cuda when available, else cpu."""

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the flag of the first bad field; returns self."""
        _positive(self, "max_steps", "batch_size", "grad_accum", "checkpoint_every", "log_every",
                  "r1_interval", "max_nonfinite")
        _non_negative(self, "warmup_steps", "keep_checkpoints", "val_pairs", "sample_every",
                      "num_workers", "lambda_gan", "r1_gamma", "grad_clip", "weight_decay")
        for name in ("lr_g", "lr_d"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} ({flag(name)}): must be a positive number, got {value!r}")
        for name in ("betas_g", "betas_d"):
            betas = tuple(getattr(self, name))
            if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
                raise ValueError(f"{name} ({flag(name)}): two numbers in [0, 1), got {betas!r}")
            setattr(self, name, betas)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay (--ema-decay): must be in [0, 1), got {self.ema_decay!r}")
        if not 0.0 <= self.mix_fraction <= 1.0:
            raise ValueError(f"mix_fraction (--mix-fraction): must be in [0, 1], got "
                             f"{self.mix_fraction!r}")
        _choice(self, "precision", PRECISIONS)
        from d2g_fast.losses.regression import REGRESSION_LOSSES

        _choice(self, "regression_loss", REGRESSION_LOSSES)
        _choice(self, "parameterization", PARAMETERIZATIONS)
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ValueError(f"device (--device): one of {DEVICES} or cuda:N, got {self.device!r}")
        from d2g_fast.nn.elatentlpips import AUGMENT_PRESETS

        if self.augment not in AUGMENT_PRESETS + (AUGMENT_NONE,):
            raise ValueError(f"augment (--augment): one of {AUGMENT_PRESETS + (AUGMENT_NONE,)}, "
                             f"got {self.augment!r}")
        if self.lpips_random and (self.lpips_dir or self.lpips_path):
            raise ValueError("lpips_random (--lpips-random): give either --lpips-random or "
                             "--lpips-dir/--lpips-path, not both")
        _non_negative(self, "lora_rank", "lora_alpha")
        if self.lora_targets and not self.lora_rank:
            raise ValueError("lora_targets (--lora-targets): set --lora-rank R as well")
        if self.light_d and self.lora_rank and self.fsdp:
            raise ValueError("light_d (--light-d): with --lora-rank D shares G's frozen base, "
                             "which FSDP2 (--fsdp) shards with G's units; use --light-d "
                             "--lora-rank without --fsdp, or --light-d --fsdp without LoRA")
        if self.overlap_phases:
            _overlap_compatible(self)
        if self.timestep is not None and self.timestep < 0:
            raise ValueError(f"timestep (--timestep): must be >= 0, got {self.timestep}")
        for name in ("teacher", "pairs", "out"):
            if not getattr(self, name):
                raise ValueError(f"{name} (--{name}): required")
        return self

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _overlap_compatible(cfg) -> None:
    # The device (--device auto resolves it) and the thread count: make_phase_pool.
    for other in ("fsdp", "gradient_checkpointing"):
        if getattr(cfg, other):
            raise ValueError(f"overlap_phases (--overlap-phases): not with {other} "
                             f"({flag(other)})")
    if cfg.light_d and cfg.lora_rank:
        raise ValueError("overlap_phases (--overlap-phases): not with --light-d and --lora-rank "
                         "(D switches G's shared adapters off and on while G's phase runs)")


def flag(name: str) -> str:
    """The command-line flag of a config field."""
    return "--" + name.replace("_", "-")


def _positive(cfg, *names):
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} ({flag(name)}): must be a positive integer, got {value!r}")


def _non_negative(cfg, *names):
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
            raise ValueError(f"{name} ({flag(name)}): must be >= 0, got {value!r}")


def _choice(cfg, name, choices):
    if getattr(cfg, name) not in choices:
        raise ValueError(f"{name} ({flag(name)}): one of {choices}, got {getattr(cfg, name)!r}")


def field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def read_config_file(path: str) -> dict:
    """A flat mapping of field names from a .json, .toml or .yaml/.yml file. Keys may use
    dashes (``lr-g``) or underscores; unknown keys are an error naming them."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config (--config): no such file {path!r}")
    lower = path.lower()
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if lower.endswith(".json"):
            data = json.loads(raw.decode("utf-8"))
        elif lower.endswith(".toml"):
            import tomllib

            data = tomllib.loads(raw.decode("utf-8"))
        elif lower.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(raw.decode("utf-8")) or {}
        else:
            raise ValueError(f"config (--config): {path!r}: use a .json, .toml or .yaml file")
    except (ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, ValueError) and str(exc).startswith("config (--config)"):
            raise
        raise ValueError(f"config (--config): {path!r} cannot be parsed: {exc}") from exc
    except Exception as exc:  # yaml.YAMLError and friends
        raise ValueError(f"config (--config): {path!r} cannot be parsed: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"config (--config): {path!r} must hold a mapping of settings")
    known = set(field_names())
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ValueError(f"config (--config): {path!r}: unknown setting {key!r}")
        out[name] = value
    return out


def build_config(file_values: dict | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults, then ``file_values``, then ``overrides`` (both dicts of field -> value)."""
    values = {**(file_values or {}), **(overrides or {})}
    known = set(field_names())
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown settings {unknown}")
    if "betas_g" in values:
        values["betas_g"] = tuple(values["betas_g"])
    if "betas_d" in values:
        values["betas_d"] = tuple(values["betas_d"])
    return TrainConfig(**values).validate()


def field_help() -> dict[str, str]:
    """Each field's docstring (the string literal under it in TrainConfig): the one source of
    the command line's help texts."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(TrainConfig)))
    body = tree.body[0].body
    helps = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and \
                isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            helps[node.target.id] = " ".join(nxt.value.value.split())
    return helps
