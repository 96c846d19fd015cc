"""Build a run: check the inputs, load the teacher and the pairs, make G, D, the losses and the
optimisers. Everything that can be refused is refused here, before any training."""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import torch

from d2g_fast.train.config import TrainConfig
from d2g_fast.train.distributed import Processes
from d2g_fast.train.generator import OneStepGenerator


@dataclass
class Run:
    """Everything a training step touches."""
    config: TrainConfig
    device: torch.device
    procs: Processes
    teacher: object                      # d2g_fast.teacher.Teacher (text encoders, configs)
    generator: OneStepGenerator
    ema: OneStepGenerator | None
    discriminator: torch.nn.Module
    d_loss: object                       # d2g_fast.losses.DiscriminatorLoss
    lpips: torch.nn.Module               # ELatentLPIPS
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    dataset: object = None               # PairDataset (None when batches come from elsewhere)
    num_train: int = 0                   # pairs [0, num_train) train, the rest are held out
    g_forward: object = None             # G, or torch.compile(G)
    d_params: list = field(default_factory=list)  # D's trainable parameters
    sharded: bool = False                # FSDP2 (config.fsdp on several processes)
    regression: torch.nn.Module = None   # G's regression loss (fake, target) -> (N,)
    phase_pool: object = None            # --overlap-phases: D's phase's thread (a ThreadPoolExecutor)
    counters: dict = field(default_factory=lambda: {"nonfinite_in_a_row": 0,
                                                    "nonfinite_skipped": 0,
                                                    "device_seconds": 0.0})

    @property
    def global_batch(self) -> int:
        c = self.config
        return c.batch_size * c.grad_accum * self.procs.world

    @property
    def micro_batches(self) -> int:
        return self.config.grad_accum * self.procs.world


# ------------------------------------------------------------------------------ inputs
def check_teacher_folder(path: str) -> None:
    """A teacher folder of a supported family with every part (d2g_fast.teacher.families)."""
    from d2g_fast.teacher.families import check_teacher_folder as check_family_folder

    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "model_index.json")):
        raise ValueError(f"teacher (--teacher): {path!r} is not a diffusers pipeline folder "
                         f"(no model_index.json)")
    check_family_folder(path)


def stored_resolution(pairs: str | None):
    """The (height, width) a pair store was collected at (None: no readable store)."""
    from d2g_fast.data.store import MANIFEST, read_manifest

    if not pairs or not os.path.isfile(os.path.join(pairs, MANIFEST)):
        return None
    try:
        return tuple(read_manifest(pairs)["config"]["resolution"])
    except Exception:  # noqa: BLE001 - open_pairs reports what is wrong with the store
        return None


def open_pairs(path: str, teacher, config: TrainConfig, world: int):
    """The pair store, checked: complete, from this teacher, big enough for the batch."""
    from d2g_fast.data import PairDataset, StoreError
    from d2g_fast.data.store import MANIFEST

    if not os.path.isdir(path):
        raise FileNotFoundError(f"pairs (--pairs): no such folder {path!r}")
    if not os.path.isfile(os.path.join(path, MANIFEST)):
        raise ValueError(f"pairs (--pairs): {path!r} is not a pair store (no {MANIFEST}); make "
                         f"one with d2g collect")
    try:
        dataset = PairDataset(path, check="size")
    except StoreError as exc:
        raise ValueError(f"pairs (--pairs): {exc}") from exc
    if len(dataset) == 0:
        raise ValueError(f"pairs (--pairs): {path!r} holds no pairs")
    stored = dataset.manifest["config"]
    if stored.get("teacher_kind", teacher.name) != teacher.name:
        raise ValueError(f"pairs (--pairs): {path!r} holds {stored['teacher_kind']} pairs; "
                         f"--teacher {config.teacher!r} is a {teacher.name} teacher")
    if teacher_sha256(teacher, config.teacher, stored.get("dtype", "float32")) != \
            stored.get("teacher_sha256"):
        raise ValueError(f"pairs (--pairs): {path!r} was collected from another teacher (its "
                         f"manifest's teacher identity differs from --teacher {config.teacher!r})")
    if tuple(stored["latent_shape"]) != tuple(teacher.latent_shape):
        raise ValueError(f"pairs (--pairs): latents {stored['latent_shape']} do not match the "
                         f"teacher's {list(teacher.latent_shape)}")
    num_train = len(dataset) - config.val_pairs
    if num_train < 1:
        raise ValueError(f"val_pairs (--val-pairs): {config.val_pairs} held-out pairs leave no "
                         f"training pairs in a store of {len(dataset)}")
    global_batch = config.batch_size * config.grad_accum * world
    if global_batch > num_train:
        raise ValueError(f"batch_size (--batch-size): the global batch of {global_batch} "
                         f"(batch size x grad accumulation x processes) is larger than the "
                         f"{num_train} training pairs of the store")
    return dataset, num_train


def teacher_sha256(teacher, folder: str, store_dtype: str) -> str:
    """The teacher's identity as the collector computed it: over the weights in the dtype the
    pairs were collected in (a float16 collection of a float32 training teacher still matches)."""
    from d2g_fast.teacher import Teacher

    if str(teacher.dtype).replace("torch.", "") == store_dtype:
        return teacher.identity()["sha256"]
    other = Teacher.from_pretrained(folder, dtype=store_dtype, device="cpu",
                                    resolution=(teacher.height, teacher.width))
    return other.identity()["sha256"]


# ------------------------------------------------------------------------------ models
def make_generator(teacher, config: TrainConfig, guidance: float | None = None,
                   guidance_set: dict | None = None) -> OneStepGenerator:
    """G: the teacher family's one-step generator (d2g_fast.train.generator); ``guidance`` is
    the pairs' collection guidance (FLUX-dev's embedding); ``guidance_set`` (pairs collected
    over several scales) makes G guidance-conditioned."""
    from d2g_fast.train.generator import make_generator as make_one_step

    return make_one_step(teacher, timestep=config.timestep,
                         parameterization=config.parameterization, guidance=guidance,
                         guidance_set=guidance_set,
                         gradient_checkpointing=config.gradient_checkpointing)


def collection_guidance(dataset) -> float | None:
    """The guidance the pairs were collected with (None without a store, or when they were
    collected over several scales: see ``collection_guidance_set``)."""
    if dataset is None or not hasattr(dataset, "manifest"):
        return None
    return dataset.manifest["config"].get("guidance")


def collection_guidance_set(dataset) -> dict | None:
    """The guidance set of pairs collected over several scales (then G and D are
    guidance-conditioned); None otherwise."""
    if dataset is None or not hasattr(dataset, "manifest"):
        return None
    return dataset.manifest["config"].get("guidance_set")


def make_discriminator(teacher, config: TrainConfig, guidance: float | None = None,
                       guidance_set: dict | None = None, shared_net=None):
    """D on the teacher's network: the teacher family's ``discriminator_class()`` (the UNet D,
    or the SD3 / FLUX transformer D) built by that class's ``build`` from the run's options
    (``discriminator_options``). ``guidance``: the collection guidance, which a guidance-embedded
    FLUX D embeds as G does; with ``guidance_set`` the UNet D gets its own zero-initialised
    guidance input and judges each pair for its guidance (FLUX-dev's D embeds each row's
    guidance already). ``config.light_d``: the light D (d2g_fast.models.light_discriminator),
    its backbone frozen; on ``shared_net`` (a LoRA G's network) when given."""
    disc_cls = teacher.discriminator_class()
    check_discriminator_flags(disc_cls, config)
    net = teacher.denoiser.float()
    return disc_cls.build(net, discriminator_options(teacher, net, config, guidance, guidance_set),
                          shared_net)


# The D flags that set an option only one kind of discriminator has: flag -> (option, what).
_D_FLAG_OPTIONS = {
    "d_taps": ("taps", "the transformer blocks an SD3 / FLUX discriminator reads (a UNet's D "
                       "reads every decoder scale)"),
    "d_multiscale_input_off": ("multiscale_input", "the UNet discriminator's multi-scale input"),
    "d_multiscale_output_off": ("multiscale_output", "the UNet discriminator's multi-scale "
                                                     "heads"),
}


def check_discriminator_flags(disc_cls, config: TrainConfig) -> None:
    """Refuse a D flag this teacher's discriminator has no option for (rather than ignore it)."""
    from d2g_fast.train.config import flag

    for name, (option, what) in _D_FLAG_OPTIONS.items():
        if getattr(config, name) and option not in disc_cls.OPTIONS:
            raise ValueError(f"{name} ({flag(name)}): sets {what}, which this teacher's "
                             f"discriminator ({disc_cls.__name__}) does not have")


def discriminator_options(teacher, net, config: TrainConfig, guidance: float | None = None,
                          guidance_set: dict | None = None):
    """The run's D options: the D flags, the taps (--d-taps, else the family's
    ``default_taps``), the guidance D embeds (the family's ``guidance_for_generator``, as G)."""
    from d2g_fast.models.discriminator import DiscriminatorOptions

    return DiscriminatorOptions(
        taps=list(config.d_taps) or teacher.default_taps(net),
        gradient_checkpointing=config.gradient_checkpointing,
        mixed_precision="bf16" if config.precision == "bf16" else "no",
        noise_conditioning=not config.d_noise_off,
        multiscale_input=not config.d_multiscale_input_off,
        multiscale_output=not config.d_multiscale_output_off,
        light=config.light_d, guidance=teacher.guidance_for_generator(guidance),
        guidance_conditioned=bool(guidance_set))


# A VAE's (shift_factor, scaling_factor) is taken to be an encoder's when both agree to this.
_NORMALIZATION_RTOL = 1e-4


def lpips_encoders_for_vae(vae_config: dict) -> list[str]:
    """The E-LatentLPIPS latent spaces (encoder names) of a VAE: the encoders with its
    ``latent_channels`` and its latent normalisation (``shift_factor``, ``scaling_factor``)."""
    from d2g_fast.nn.elatentlpips import ENCODER_CHANNELS, ENCODER_NORMALIZATION

    channels = int(vae_config.get("latent_channels", 4))
    shift = float(vae_config.get("shift_factor") or 0.0)
    scale = float(vae_config.get("scaling_factor") or 0.0)
    return [name for name, (s, k) in ENCODER_NORMALIZATION.items()
            if ENCODER_CHANNELS[name] == channels
            and abs(s - shift) <= _NORMALIZATION_RTOL * max(abs(s), 1e-3)
            and abs(k - scale) <= _NORMALIZATION_RTOL * abs(k)]


def lpips_encoder(teacher, config: TrainConfig) -> str:
    """The E-LatentLPIPS encoder of the run: --lpips-encoder, else the one whose latent space
    is the teacher VAE's (latent channels, shift and scale; the family's own name first when
    several share a space, e.g. sd15/sd21). A VAE no encoder matches is refused unless the loss
    does not need the name's weights (--lpips-random, or a .safetensors --lpips-path, which
    records its own latent space)."""
    if config.lpips_encoder:
        return config.lpips_encoder
    if not teacher.vae_config:
        return teacher.lpips_encoder
    matches = lpips_encoders_for_vae(teacher.vae_config)
    if matches:
        return teacher.lpips_encoder if teacher.lpips_encoder in matches else matches[0]
    if config.lpips_random or (config.lpips_path or "").endswith(".safetensors"):
        return teacher.lpips_encoder
    from d2g_fast.nn.elatentlpips import ENCODER_CHANNELS, ENCODER_NORMALIZATION

    vae = teacher.vae_config
    known = ", ".join(f"{n} ({ENCODER_CHANNELS[n]} ch, shift {s:g}, scale {k:g})"
                      for n, (s, k) in ENCODER_NORMALIZATION.items())
    raise ValueError(
        f"lpips_encoder (--lpips-encoder): the teacher's VAE (latent_channels "
        f"{vae.get('latent_channels')}, shift_factor {vae.get('shift_factor')}, scaling_factor "
        f"{vae.get('scaling_factor')}) matches no E-LatentLPIPS latent space ({known}); pass "
        f"--lpips-path with a loss trained for this VAE (d2g lpips train-trunk / calibrate), or "
        f"--lpips-encoder NAME to use another space's weights anyway")


def make_lpips(teacher, config: TrainConfig):
    """E-LatentLPIPS, frozen, in eval mode; weights from --lpips-path, --lpips-dir /
    $D2G_ELATENTLPIPS_DIR, or random with --lpips-random."""
    from d2g_fast.nn.elatentlpips import ELatentLPIPS
    from d2g_fast.nn.elatentlpips_io import CHECKPOINT_DIR_ENV, heads_filename

    augment = None if config.augment == "none" else config.augment
    encoder = lpips_encoder(teacher, config)
    common = dict(augment=augment, precision=config.precision, verbose=False,
                  check_inputs=False)
    if config.lpips_random:
        return ELatentLPIPS(pretrained=False, pnet_rand=True, encoder=encoder, **common)
    if config.lpips_path:
        if not os.path.isfile(config.lpips_path):
            raise FileNotFoundError(f"lpips_path (--lpips-path): no such file "
                                    f"{config.lpips_path!r}")
        if config.lpips_path.endswith(".safetensors"):
            return ELatentLPIPS.from_safetensors(config.lpips_path, **common)
        return ELatentLPIPS(pretrained=True, heads_path=config.lpips_path, encoder=encoder,
                            **common)
    folder = config.lpips_dir or os.environ.get(CHECKPOINT_DIR_ENV, "")
    if not folder:
        raise ValueError("lpips_dir (--lpips-dir): E-LatentLPIPS weights are needed: pass "
                         "--lpips-dir DIR (the official files), --lpips-path FILE, set "
                         f"{CHECKPOINT_DIR_ENV}, or --lpips-random for a random (toy) loss")
    path = os.path.join(folder, heads_filename(encoder))
    twin = path[:-len(".pth")] + ".safetensors"
    path = twin if os.path.isfile(twin) else path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"lpips_dir (--lpips-dir): {path!r} is missing (the tuned "
                                f"E-LatentLPIPS file for encoder {encoder!r})")
    return ELatentLPIPS(pretrained=True, heads_path=path, encoder=encoder, **common)


def make_optimizers(generator, discriminator, config: TrainConfig):
    g_params, d_params = trainable_parameters(generator), trainable_parameters(discriminator)
    opt_g = torch.optim.AdamW(g_params, lr=config.lr_g, betas=config.betas_g,
                              weight_decay=config.weight_decay, **_cpu_fused(g_params, config))
    opt_d = torch.optim.AdamW(d_params, lr=config.lr_d, betas=config.betas_d,
                              weight_decay=config.weight_decay, **_cpu_fused(d_params, config))
    return opt_g, opt_d


def _cpu_fused(params: list, config: TrainConfig) -> dict:
    """AdamW's fused kernel for plain CPU parameters: one pass over all of them instead of
    the foreach kernels' several, 4x faster at the toy's 1.1 M parameters (issue 23; the same
    update up to rounding). Not for FSDP's DTensor parameters."""
    if config.fsdp or not params or any(p.device.type != "cpu" for p in params):
        return {}
    return {"fused": True}


def trainable_parameters(module) -> list:
    return [p for p in module.parameters() if p.requires_grad]


def make_ema(generator: OneStepGenerator, config: TrainConfig) -> OneStepGenerator | None:
    if config.ema_decay <= 0:
        return None
    ema = copy.deepcopy(generator).eval().requires_grad_(False)
    return ema


# ------------------------------------------------------------------------------ the run
def load_teacher(config: TrainConfig, device: torch.device):
    from d2g_fast.teacher import Teacher

    check_teacher_folder(config.teacher)
    # At the pairs' resolution (flow-matching pipelines default to large images).
    teacher = Teacher.from_pretrained(config.teacher, dtype="float32", device="cpu",
                                      resolution=stored_resolution(config.pairs))
    return teacher


def build_run(config: TrainConfig, *, teacher=None, dataset=None, procs: Processes | None = None,
              device: torch.device | str | None = None, guidance: float | None = None) -> Run:
    """Make every piece of a run.

    Args:
        config: the validated configuration (its teacher/pairs paths are used only when
            ``teacher`` / ``dataset`` are not given).
        teacher: a :class:`d2g_fast.teacher.Teacher` (default: loaded from ``config.teacher``).
        dataset: a pair dataset; None with a given teacher means "batches come from the caller"
            (benchmarks); None without a teacher opens ``config.pairs``.
        procs, device: this process (default: one process on ``config.device``).
        guidance: the collection guidance when there is no store to read it from (benchmarks;
            FLUX-dev's G embeds it).
    Returns:
        a :class:`Run` on ``device``.
    """
    procs = procs or Processes()
    if device is None:
        device = config.device if config.device != "auto" else \
            ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    phase_pool = make_phase_pool(config, device)
    num_train = 0
    # New parameters (D's heads and zero-convs, a random E-LatentLPIPS) are drawn from the seed,
    # so every process and every resumed run builds the same networks.
    from d2g_fast.data.seeding import derive_seed

    torch.manual_seed(derive_seed(config.seed, 0, "train-init"))
    if teacher is None:
        teacher = load_teacher(config, device)
        dataset, num_train = open_pairs(config.pairs, teacher, config, procs.world)
    elif dataset is not None:
        num_train = len(dataset) - config.val_pairs
    guidance_set = None
    if dataset is not None:
        guidance = collection_guidance(dataset)
        guidance_set = collection_guidance_set(dataset)
    generator = make_generator(teacher, config, guidance, guidance_set)
    if config.lora_rank:  # a LoRA student: frozen teacher weights, trainable adapters
        from d2g_fast.train.lora import make_lora_generator, settings

        make_lora_generator(generator, teacher, settings(config))
    # A light D on a LoRA G runs G's frozen base (one copy of the teacher's network).
    shared = generator.net if config.light_d and config.lora_rank else None
    discriminator = make_discriminator(teacher, config, guidance, guidance_set, shared)
    lpips = make_lpips(teacher, config)
    from d2g_fast.losses.regression import make_regression_loss

    regression = make_regression_loss(config.regression_loss, lpips, config.teacher)
    # From here on the teacher only encodes text (its UNet stays with it: Teacher reads its
    # device and SDXL's added-condition layout from it).
    teacher.to(device=device)
    generator.to(device)
    discriminator.to(device)
    lpips.to(device)
    regression.to(device)
    ema = make_ema(generator, config)
    sharded = config.fsdp and procs.world > 1
    if sharded:
        from d2g_fast.train.distributed import shard_discriminator, shard_generator

        shard_generator(generator, teacher.blocks(generator.net))
        if ema is not None:
            shard_generator(ema, teacher.blocks(ema.net))
        shard_discriminator(discriminator)
    opt_g, opt_d = make_optimizers(generator, discriminator, config)
    g_forward = torch.compile(generator) if config.compile else generator
    return Run(config=config, device=device, procs=procs, teacher=teacher, generator=generator,
               ema=ema, discriminator=discriminator,
               d_loss=make_d_loss(config), lpips=lpips, opt_g=opt_g, opt_d=opt_d,
               dataset=dataset, num_train=num_train, g_forward=g_forward,
               d_params=trainable_parameters(discriminator), sharded=sharded,
               regression=regression, phase_pool=phase_pool)


def make_phase_pool(config: TrainConfig, device: torch.device):
    """D's thread of --overlap-phases (d2g_fast.train.step.overlapped_micro_step), or None."""
    if not config.overlap_phases:
        return None
    if device.type != "cpu":
        raise ValueError(f"overlap_phases (--overlap-phases): a CPU setting (a GPU's stream "
                         f"already queues both phases' kernels); this run's device is {device}")
    if torch.get_num_threads() < 2:
        raise ValueError("overlap_phases (--overlap-phases): needs at least 2 torch threads "
                         "(one per phase); this process has 1 (OMP_NUM_THREADS, "
                         "torch.set_num_threads)")
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="d2g-d-phase")


def make_d_loss(config: TrainConfig):
    from d2g_fast.losses import DiscriminatorLoss

    return DiscriminatorLoss(r1_gamma=config.r1_gamma, r1_interval=config.r1_interval,
                             mix_fraction=config.mix_fraction)
