"""The one interface every teacher family implements (``TeacherFamily``).

A *family* is one kind of diffusers text-to-image pipeline: ``sd`` (SD1.5/SD2.1 UNets), ``sdxl``,
``sd3`` (SD3/SD3.5 MMDiT, flow matching) and ``flux`` (FLUX.1, flow matching, packed latents).
Everything that differs between them lives in one class per family, in one file each; the
collector, the trainer, the discriminator, the export and the evaluation only call the methods
below (they never test which family they hold). The registry in
:mod:`d2g_fast.teacher.families` maps the ``_class_name`` of a folder's ``model_index.json`` to
its family class.

The interface, in the order a run uses it (shapes: B batch, C latent channels, h x w the
UNPACKED latent grid of ``latent_shape``; FLUX latents are unpacked everywhere outside the
network call):

Loading
    ``Family.from_pretrained(folder, dtype=, device=, resolution=)`` loads the pipeline parts
    from a local folder (never downloads; the VAE's config only, not its weights);
    ``Family.from_pipeline(pipe)`` wraps a pipeline object. ``name`` is the family name stored
    in manifests (``teacher_kind``); ``denoiser`` is the network (``unet`` or ``transformer``
    attribute, ``denoiser_name`` says which); ``latent_shape`` = (C, h, w); ``height, width``
    the resolution in pixels; ``lpips_encoder`` the E-LatentLPIPS latent space name.
Prompts
    ``encode_prompts(prompts, negative_prompt, guided) -> Conditioning``: exactly the pipeline's
    encoding. ``Conditioning.encoder_hidden_states`` / ``added_cond_kwargs`` are already in the
    layout of one batched network call (negatives first when guided);
    ``prompt_embeds`` [B, L, D] and ``pooled_prompt_embeds`` [B, P] (or None) are what a store
    keeps (``--store-embeddings``). ``conditioning_from_store(prompt_embeds, pooled)`` turns
    stored embeddings back into (encoder_hidden_states, added_cond_kwargs) for an UNGUIDED call.
Network call and x0
    ``denoise(net, x, t, encoder_hidden_states, added_cond_kwargs, guidance=None)`` (a
    classmethod: ``net`` may be the teacher's network or a trainable copy) calls the network on
    latents x [B, C, h, w] at the scheduler timestep ``t`` (a scalar or [B] tensor: UNets the
    integer timestep, flow models ``sigma * num_train_timesteps``) and returns its raw output in
    the latent layout [B, C, h, w]. ``guidance`` is FLUX-dev's embedded guidance (ignored by the
    other families). ``noise_level(t)`` is the scalar that ``output_to_x0(output, x_t, level,
    prediction_type)`` needs (UNets: alphas_cumprod[t]; flow models: sigma = t / T), and
    ``to_x0(output, x_t, t)`` combines them with the teacher's own prediction type.
Sampling
    ``sample(noise, prompts, steps=, guidance=, scheduler=, negative_prompt=, ...)`` is the
    deterministic multi-step solve from noise [B, C, h, w]; it returns float32 latents equal to
    the stock pipeline's ``output_type="latent"`` result (FLUX: unpacked). ``make_scheduler(name)``
    gives the sampler (``None``: the family default: DDIM for UNets, the folder's own
    FlowMatchEulerDiscreteScheduler for flow models).
The one-step generator
    ``one_step_rule(timestep, parameterization, guidance)`` describes G: the network evaluated
    once on pure noise at ``timestep`` (None: the start of the teacher's schedule, t = T - 1 for
    UNets, sigma = 1 for flow models), its output turned into x0. ``guidance_for_generator(g)``
    is the embedded-guidance value G's network gets when the pairs were collected at guidance g
    (None for families without a guidance embedding).
Discriminator
    ``discriminator_class()`` (a classmethod) is the discriminator built on the family's
    network (:mod:`d2g_fast.models`: the UNet ``DiffusionDiscriminator`` or a
    ``TransformerDiscriminator`` subclass), which the trainer builds with the class's
    ``build(net, DiscriminatorOptions, shared_net)`` (its ``OPTIONS`` say which run options it
    reads); ``blocks(net)`` lists the network's repeated blocks
    in forward order (FSDP units; the candidates for discriminator taps); ``default_taps(net)``
    the block indices tapped by default; ``tokens_to_grid(tokens)`` reshapes the image tokens
    [B, N, D] of a transformer block into a grid [B, D, h / p, w / p] (p: patch size, 2 for SD3
    and FLUX's packing).
Export
    ``export_scheduler(prediction_type)`` is the scheduler that makes the stock pipeline call
    the network exactly once, at G's timestep, and return G's x0;
    ``export_guidance(collection_guidance)`` the ``guidance_scale`` a user passes to the
    exported pipeline (see the family docstrings); ``export_check(rule)`` refuses students the
    stock pipeline cannot reproduce.
Identity
    ``identity()`` hashes the configs and weights of the network and text encoders, the
    tokenizers, the VAE config and the scheduler config.

A new family subclasses :class:`TeacherFamily` (or ``UNetFamily`` / ``FlowFamily``) in one new
file, lists its pipeline class in ``pipeline_classes`` and is added to ``FAMILIES`` in
``families/__init__.py``; see the README ("How to add a teacher family").
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class NonFiniteLatentError(RuntimeError):
    """The teacher produced NaN or Inf latents; they are never stored."""


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype (--dtype): unknown dtype {dtype!r}; use one of "
                         f"float32, float16, bfloat16") from None


def clean_config(config) -> dict:
    """A config as a plain dict without the keys that change with saving/loading/casting."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    drop = {"_name_or_path", "transformers_version", "_diffusers_version", "torch_dtype", "dtype",
            "_commit_hash", "_use_default_values", "output_hidden_states", "architectures"}
    return {k: v for k, v in sorted(d.items()) if k not in drop and not k.startswith("_")}


def read_model_index(path: str) -> dict:
    """The ``model_index.json`` of a local diffusers folder (ValueError naming --teacher)."""
    index_file = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_file):
        raise FileNotFoundError(f"teacher (--teacher): {path!r} is not a local diffusers "
                                f"folder (no model_index.json)")
    with open(index_file, encoding="utf-8") as f:
        return json.load(f)


@dataclass
class Conditioning:
    """Text conditioning of a batch, already in the layout of one batched (CFG) network call."""
    encoder_hidden_states: torch.Tensor        # [2B or B, L, D]: negatives first when guided
    added_cond_kwargs: dict | None             # family-specific extra inputs ([2B|B, ...] each)
    prompt_embeds: torch.Tensor                # [B, L, D] the positive embeddings (for storing)
    pooled_prompt_embeds: torch.Tensor | None  # [B, P] (SDXL, SD3, FLUX)


@dataclass(frozen=True)
class OneStepRule:
    """How the one-step generator reads its network: ``family`` (a registry name), the fixed
    input ``timestep`` (scheduler units), ``level`` (``noise_level(timestep)``: alpha-bar for
    UNets, sigma for flow models), ``prediction_type`` (how the output becomes x0; "sample" means
    the network outputs x0 itself) and the embedded ``guidance`` (FLUX-dev; else None). Small
    and copyable: G and its EMA hold one each, never the teacher."""
    family: str
    timestep: float
    level: float
    prediction_type: str
    guidance: float | None = None


class TeacherFamily:
    """Base class of the teacher families; see the module docstring for the interface."""

    name = "base"
    pipeline_classes: tuple[str, ...] = ()
    denoiser_name = "unet"
    denoiser_label = "UNet"   # what the network is called in messages
    # (tokenizer, text encoder) component names in the pipeline's order; optional ones may be
    # absent from a folder (the family decides what absence means).
    text_pairs = (("tokenizer", "text_encoder"),)
    optional_components: tuple[str, ...] = ()
    requires_vae = False
    lpips_encoder = "sd15"
    default_scheduler: str | None = "ddim"
    # `d2g collect --guidance` when not given: the classifier-free scale of the paper's SD
    # students; families with an embedded guidance use their pipeline's own default.
    default_guidance = 8.0
    stores_pooled = True      # encode_prompts gives a pooled embedding (stored with the pairs)
    latent_note: str | None = None  # how stored latents relate to the pipeline's, if not equal

    def __init__(self, components: dict, *, vae_config=None, pipeline_config: dict | None = None,
                 resolution: int | tuple[int, int] | None = None, source: str | None = None):
        for key, value in components.items():
            setattr(self, key, value)
        for _, enc in self.text_pairs:
            if not hasattr(self, enc):
                setattr(self, enc, None)
        for tok, _ in self.text_pairs:
            if not hasattr(self, tok):
                setattr(self, tok, None)
        self.base_scheduler = components["scheduler"]
        self.vae_config = clean_config(vae_config) if vae_config is not None else None
        self.pipeline_config = dict(pipeline_config or {})
        self.source = source
        self._forward = self.denoiser
        self._channels_last = False
        self._negative_cache: dict = {}
        self._identity: dict | None = None
        if self.requires_vae and self.vae_config is None:
            raise ValueError(f"teacher (--teacher): a {self.name} teacher needs its VAE (vae/ "
                             f"folder): the latent scale factor and the decoder come from it")
        blocks = (self.vae_config or {}).get("block_out_channels", [0, 0, 0, 0])
        self.vae_scale_factor = 2 ** (len(blocks) - 1)
        self.check_components()
        self.height, self.width = self._resolve_resolution(resolution)

    # ------------------------------------------------------------------ construction
    @classmethod
    def component_names(cls) -> list[str]:
        names = [cls.denoiser_name, "scheduler"]
        for tok, enc in cls.text_pairs:
            names += [tok, enc]
        return names

    @classmethod
    def from_pipeline(cls, pipe, resolution=None, source: str | None = None):
        """From a diffusers pipeline object of this family."""
        comps = pipe.components
        components = {k: comps.get(k) for k in cls.component_names()}
        vae = comps.get("vae")
        return cls(components, vae_config=vae.config if vae is not None else None,
                   pipeline_config=dict(pipe.config), resolution=resolution, source=source)

    @classmethod
    def from_pretrained(cls, path: str, *, dtype="float32", device="cpu", resolution=None):
        """From a local diffusers folder of this family. Never downloads: every load is
        ``local_files_only``. The VAE's config is read, its weights are not."""
        import diffusers
        import transformers

        index = read_model_index(path)
        dtype = parse_dtype(dtype)

        def present(name):
            entry = index.get(name)
            return isinstance(entry, (list, tuple)) and entry[0] is not None and \
                os.path.isdir(os.path.join(path, name))

        components = {}
        for name in cls.component_names():
            if not present(name):
                if name in cls.optional_components:
                    components[name] = None
                    continue
                if name == cls.denoiser_name or name == "scheduler":
                    raise ValueError(f"teacher (--teacher): {path!r} has no {name}/ (a "
                                     f"{cls.name} pipeline folder needs it)")
                components[name] = None
                continue
            lib, cls_name = index[name]
            sub = os.path.join(path, name)
            if name == "scheduler":
                components[name] = getattr(diffusers, cls_name).from_pretrained(
                    path, subfolder="scheduler", local_files_only=True)
            elif name.startswith("tokenizer"):
                tok_cls = getattr(transformers, cls_name, transformers.AutoTokenizer)
                components[name] = tok_cls.from_pretrained(sub, local_files_only=True)
            elif lib == "transformers":
                components[name] = getattr(transformers, cls_name).from_pretrained(
                    sub, dtype=dtype, local_files_only=True).eval()
            else:
                components[name] = getattr(diffusers, cls_name).from_pretrained(
                    path, subfolder=name, torch_dtype=dtype, local_files_only=True).eval()
        vae_config = diffusers.AutoencoderKL.load_config(path, subfolder="vae",
                                                         local_files_only=True) \
            if present("vae") else None
        pipeline_config = {k: v for k, v in index.items() if not isinstance(v, (list, tuple))}
        teacher = cls(components, vae_config=vae_config, pipeline_config=pipeline_config,
                      resolution=resolution, source=os.path.abspath(path))
        return teacher.to(device=device, dtype=dtype)

    @classmethod
    def check_folder(cls, path: str, resolution=None) -> None:
        """Refuse a folder of this family that cannot load as a teacher (a missing part, a
        resolution the patch grid cannot divide) from its JSON files alone: nothing is loaded
        and nothing written, so commands call it before creating their output."""
        index = read_model_index(path)
        required = [cls.denoiser_name, "scheduler"] + (["vae"] if cls.requires_vae else []) + \
            [n for pair in cls.text_pairs for n in pair if n not in cls.optional_components]
        for name in required:
            entry = index.get(name)
            if not (isinstance(entry, (list, tuple)) and entry[0] is not None
                    and os.path.isdir(os.path.join(path, name))):
                what = f" (its {cls.denoiser_label})" if name == cls.denoiser_name else ""
                raise ValueError(f"teacher (--teacher): {path!r} has no {name}/{what}; a "
                                 f"{cls.name} teacher needs it")
        if resolution is None or not os.path.isfile(os.path.join(path, "vae", "config.json")):
            return
        with open(os.path.join(path, "vae", "config.json"), encoding="utf-8") as f:
            vae = json.load(f)
        with open(os.path.join(path, cls.denoiser_name, "config.json"), encoding="utf-8") as f:
            net = json.load(f)
        m = 2 ** (len(vae.get("block_out_channels", [0])) - 1) * cls.patch_of(net)
        res = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        if any(r < m or r % m for r in res):
            raise ValueError(f"resolution (--resolution): {res} is not a positive multiple of "
                             f"{m} (the {cls.name} teacher's VAE factor x patch size)")

    @classmethod
    def patch_of(cls, denoiser_config: dict) -> int:
        """Latent pixels per network token side (1 for UNets)."""
        return 1

    def check_components(self) -> None:
        """Refuse parts that do not fit the family (ValueError naming the part)."""

    def default_resolution(self) -> tuple[int, int]:
        """(height, width) in pixels the pipeline uses when none is given."""
        raise NotImplementedError

    def resolution_multiple(self) -> int:
        """Pixel sizes must be multiples of this (VAE factor x patch size x packing)."""
        return self.vae_scale_factor

    def _resolve_resolution(self, resolution) -> tuple[int, int]:
        if resolution is None:
            return self.default_resolution()
        res = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        m = self.resolution_multiple()
        if len(res) != 2 or res[0] < m or res[1] < m or res[0] % m or res[1] % m:
            raise ValueError(f"resolution (--resolution): {res} is not a positive multiple of "
                             f"{m} (the {self.name} teacher's VAE factor x patch size)")
        return int(res[0]), int(res[1])

    # ------------------------------------------------------------------ properties
    @property
    def denoiser(self) -> torch.nn.Module:
        """The teacher's network (UNet or transformer)."""
        return getattr(self, self.denoiser_name)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one (unpacked) latent."""
        raise NotImplementedError

    def _text_pairs(self):
        pairs = [(getattr(self, t), getattr(self, e)) for t, e in self.text_pairs]
        return [(t, e) for t, e in pairs if t is not None and e is not None]

    def to(self, device=None, dtype=None):
        """Move/cast the network and text encoders (in place); returns self."""
        dtype = parse_dtype(dtype) if dtype is not None else None
        for m in [self.denoiser] + [e for _, e in self._text_pairs()]:
            m.to(device=device, dtype=dtype)
        self._negative_cache.clear()
        return self

    def optimize(self, *, channels_last: bool = False, compile: bool = False,
                 compile_mode: str | None = None, fuse_qkv: bool = False,
                 cuda_graphs: bool = False):
        """Speed options: channels_last (UNets), fused QKV projections, ``torch.compile`` of the
        network forward. CUDA-graph replay is a UNet option (see the UNet families)."""
        if compile and cuda_graphs:
            raise ValueError("cuda_graphs: choose torch.compile (mode 'reduce-overhead' uses CUDA "
                             "graphs) or cuda_graphs, not both")
        if fuse_qkv and hasattr(self.denoiser, "fuse_qkv_projections"):
            self.identity()  # of the weights as loaded: fusing adds fused copies to the state
            try:
                self.denoiser.fuse_qkv_projections()
            except (ValueError, NotImplementedError, AttributeError) as exc:
                warnings.warn(f"fuse_qkv: not applied ({exc})", RuntimeWarning, stacklevel=2)
        if channels_last and self.denoiser_name == "unet":
            self.denoiser.to(memory_format=torch.channels_last)
            self._channels_last = True
        if compile:
            self._forward = torch.compile(self.denoiser, mode=compile_mode, fullgraph=False)
        if cuda_graphs:
            self._enable_cuda_graphs()
        return self

    def _enable_cuda_graphs(self) -> None:
        raise ValueError(f"cuda_graphs (--cuda-graphs): not available for {self.name} teachers")

    def make_scheduler(self, name: str | None = None):
        """A sampler of the named kind from the teacher's scheduler config (None: the family
        default)."""
        from d2g_fast.teacher.schedulers import make_scheduler

        return make_scheduler(name or self.default_scheduler, self.base_scheduler.config)

    def warn_if_stochastic(self, scheduler_name: str | None):
        from d2g_fast.teacher.schedulers import STOCHASTIC

        cls_name = type(self.make_scheduler(scheduler_name)).__name__
        if cls_name in STOCHASTIC:
            warnings.warn(f"scheduler {cls_name} draws fresh noise at every step: the pairs are "
                          f"reproducible (seeded per batch) but not a deterministic ODE map",
                          RuntimeWarning, stacklevel=2)

    # ------------------------------------------------------------------ identity
    def identity(self) -> dict:
        """What identifies the teacher: a sha256 over the configs and weights of the network and
        text encoders, the tokenizers' vocabularies, the VAE config and the base scheduler
        config. Independent of the device; the weights are hashed in their current dtype."""
        if self._identity is not None:
            return self._identity
        h = hashlib.sha256()

        def add(tag: str, payload: bytes):
            h.update(tag.encode() + b"\0" + len(payload).to_bytes(8, "little"))
            h.update(payload)

        modules = [(self.denoiser_name, self.denoiser)] + \
            [(e, getattr(self, e)) for _, e in self.text_pairs]
        for name, module in modules:
            if module is None:
                continue
            add(name + ".config", json.dumps(clean_config(module.config), sort_keys=True,
                                             default=str).encode())
            for key, tensor in sorted(module.state_dict().items()):
                t = tensor.detach().to("cpu").contiguous()
                add(f"{name}.{key}:{t.dtype}:{tuple(t.shape)}",
                    t.reshape(-1).view(torch.uint8).numpy().tobytes())
        for name, _ in self.text_pairs:
            tok = getattr(self, name)
            if tok is not None:
                add(name, json.dumps([sorted(tok.get_vocab().items()), tok.model_max_length])
                    .encode())
        add("vae.config", json.dumps(self.vae_config, sort_keys=True, default=str).encode())
        add("scheduler.config", json.dumps(clean_config(self.base_scheduler.config),
                                           sort_keys=True, default=str).encode())
        self._identity = {
            "sha256": h.hexdigest(),
            "kind": self.name,
            "denoiser_class": type(self.denoiser).__name__,
            "prediction_type": self.prediction_type,
            "latent_shape": list(self.latent_shape),
            "resolution": [self.height, self.width],
            "source": self.source,
        }
        return self._identity

    @property
    def prediction_type(self) -> str:
        """What the network predicts ("epsilon", "v_prediction", "sample", or "flow" for
        flow-matching velocity)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ prompts
    def max_sequence_lengths(self) -> list[int]:
        """The token limit of each tokenizer, in ``text_pairs`` order (present ones)."""
        return [t.model_max_length for t, _ in self._text_pairs()]

    def max_prompt_tokens(self) -> int:
        return min(self.max_sequence_lengths())

    def count_truncated(self, prompts: list[str]) -> int:
        """How many prompts are longer than a tokenizer limit (they are truncated, as the
        diffusers pipelines do)."""
        from transformers.utils import logging as hf_logging

        over = torch.zeros(len(prompts), dtype=torch.bool)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # untruncated tokenizing warns; we only count here
        try:
            for (tok, _), limit in zip(self._text_pairs(), self.max_sequence_lengths()):
                for start in range(0, len(prompts), 4096):
                    chunk = prompts[start:start + 4096]
                    ids = tok(chunk, padding=False, truncation=False)["input_ids"]
                    over[start:start + len(chunk)] |= torch.tensor([len(x) > limit for x in ids])
        finally:
            hf_logging.set_verbosity(verbosity)
        return int(over.sum())

    def encode_prompts(self, prompts: list[str], negative_prompt: str | None = None,
                       guided: bool = True) -> Conditioning:
        raise NotImplementedError

    def conditioning_from_store(self, prompt_embeds: torch.Tensor,
                                pooled_prompt_embeds: torch.Tensor | None):
        """(encoder_hidden_states, added_cond_kwargs) for an unguided network call from stored
        embeddings (already on the wanted device/dtype)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ network and x0
    @classmethod
    def denoise(cls, net, x, t, encoder_hidden_states, added_cond_kwargs=None, guidance=None):
        raise NotImplementedError

    def noise_level(self, t) -> float:
        raise NotImplementedError

    @staticmethod
    def output_to_x0(output, x_t, level, prediction_type: str):
        raise NotImplementedError

    def to_x0(self, output, x_t, t):
        """The clean latent the teacher's own output at timestep ``t`` implies."""
        level = torch.as_tensor(self.noise_level(t), dtype=torch.float32, device=output.device)
        return self.output_to_x0(output.float(), x_t.float(), level, self.prediction_type)

    # ------------------------------------------------------------------ sampling
    def _check_sample_args(self, noise, prompts, steps) -> None:
        if noise.ndim != 4 or tuple(noise.shape[1:]) != self.latent_shape:
            raise ValueError(f"noise: expected shape [B, {', '.join(map(str, self.latent_shape))}]"
                             f", got {list(noise.shape)}")
        if len(prompts) != noise.shape[0]:
            raise ValueError(f"prompts: {len(prompts)} prompts for a batch of {noise.shape[0]}")
        if steps < 1:
            raise ValueError(f"steps (--steps): must be >= 1, got {steps}")

    @staticmethod
    def _check_finite(latents, prompts) -> None:
        bad = ~torch.isfinite(latents).flatten(1).all(dim=1)
        if bool(bad.any()):
            rows = bad.nonzero().flatten().tolist()
            raise NonFiniteLatentError(
                f"the teacher produced NaN/Inf latents for batch rows {rows} "
                f"(prompts {[prompts[r] for r in rows][:4]}); nothing was stored. Check the "
                f"teacher weights and --dtype (float16 overflows in some networks: try bfloat16)")

    @classmethod
    def check_sample_options(cls, negative_prompt, scheduler: str | None = None) -> None:
        """Refuse sampling options the family does not have (ValueError naming the flag)."""
        cls.check_scheduler_name(scheduler)

    @classmethod
    def check_scheduler_name(cls, name: str | None) -> None:
        """Refuse an unknown sampler name (ValueError naming --scheduler)."""
        from d2g_fast.teacher.schedulers import scheduler_class

        scheduler_class(name or cls.default_scheduler)

    def sample(self, noise, prompts, *, steps=50, guidance=7.5, scheduler=None,
               negative_prompt=None, generator=None, conditioning=None, check_finite=True):
        raise NotImplementedError

    # ------------------------------------------------------------------ generator / export
    def default_generator_timestep(self):
        raise NotImplementedError

    def one_step_rule(self, timestep=None, parameterization: str = "teacher",
                      guidance: float | None = None) -> OneStepRule:
        """G's reading of its network (see :class:`OneStepRule`); ``parameterization`` "x0"
        makes the network output x0 itself."""
        if parameterization not in ("teacher", "x0"):
            raise ValueError(f"parameterization (--parameterization): 'teacher' or 'x0', got "
                             f"{parameterization!r}")
        if timestep is None:
            timestep = self.default_generator_timestep()
        self.check_generator_timestep(timestep)
        prediction = "sample" if parameterization == "x0" else self.prediction_type
        return OneStepRule(self.name, timestep, float(self.noise_level(timestep)), prediction,
                           self.guidance_for_generator(guidance))

    def check_generator_timestep(self, timestep) -> None:
        pass

    def guidance_for_generator(self, collection_guidance: float | None) -> float | None:
        return None

    # A guidance-conditioned student (pairs collected over several guidance scales): the family
    # gives G's (and a UNet D's) network a guidance input whose new weights start at zero, so
    # that the network first computes exactly what it did without one; ``denoise(...,
    # guidance=)`` then takes one scale per row ([B] float32).
    def add_guidance_input(self, net) -> None:
        """Give ``net`` (a copy of the teacher's network) a zero-initialised guidance input."""
        raise ValueError(f"pairs (--pairs): a {self.name} teacher has no guidance input for a "
                         f"one-step student (diffusers' stock pipeline of this family cannot "
                         f"feed one); collect with a single --guidance")

    def export_scheduler(self, prediction_type: str):
        raise NotImplementedError

    def export_guidance(self, collection_guidance: float) -> float:
        """The ``guidance_scale`` to pass to the exported one-step pipeline."""
        return 1.0

    def export_check(self, rule: dict) -> None:
        """Refuse a student (its stored rule as a dict) the stock pipeline cannot reproduce."""

    # ------------------------------------------------------------------ stock pipelines
    # For code that drives a stock diffusers pipeline of the family (d2g sample, d2g eval).
    @classmethod
    def pipeline_latent_shape(cls, pipe, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the unpacked initial noise for an image of height x width pixels."""
        f = int(pipe.vae_scale_factor)
        return int(pipe.vae.config.latent_channels), height // f, width // f

    @classmethod
    def pipeline_default_size(cls, pipe) -> int:
        """The pipeline's default image side in pixels."""
        return int(pipe.default_sample_size) * int(pipe.vae_scale_factor)

    @classmethod
    def pipeline_latents(cls, latents: torch.Tensor) -> torch.Tensor:
        """Unpacked noise [n, C, h, w] in the layout the pipeline's ``latents=`` takes."""
        return latents

    # ------------------------------------------------------------------ discriminator
    @classmethod
    def discriminator_class(cls) -> type:
        """The discriminator class built on this family's network (d2g_fast.models)."""
        raise NotImplementedError(f"discriminator: the {cls.name} teacher family's "
                                  f"{cls.denoiser_label} has no discriminator")

    def blocks(self, net) -> list:
        """The network's repeated blocks in forward order (FSDP units, tap candidates)."""
        raise NotImplementedError

    def default_taps(self, net) -> list[int]:
        raise NotImplementedError

    def tokens_to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
