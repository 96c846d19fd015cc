"""The teacher: a text-to-image latent diffusion model run with a deterministic sampler.

``Teacher`` wraps the diffusers/transformers components of an SD1.5/SD2.1-shaped model (one CLIP
text encoder, epsilon or v prediction) or an SDXL-shaped model (two text encoders, pooled
embeddings, added time ids) and reproduces what the matching diffusers pipeline computes for
``output_type="latent"`` (same prompt encoding, same classifier-free guidance, same scheduler
calls), with three differences that only make it faster or more accurate:
  * the unguided and guided UNet passes are one batched call (as in diffusers);
  * the negative-prompt embedding is computed once per batch size and reused;
  * the latents and the scheduler arithmetic stay in float32 while the UNet runs in the compute
    dtype (bf16/fp16), optionally channels_last and under ``torch.compile``.
In float32 its output equals the pipeline's to rounding (tested to 1e-5 on tiny models).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import warnings
from dataclasses import dataclass

import torch

from d2g_fast.teacher.schedulers import STOCHASTIC, make_scheduler

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


@dataclass
class Conditioning:
    """Text conditioning of a batch, already in the layout of one batched CFG UNet call."""
    encoder_hidden_states: torch.Tensor        # [2B or B, L, D]: negatives first when guided
    added_cond_kwargs: dict | None             # SDXL: text_embeds [2B|B, P], time_ids [2B|B, 6]
    prompt_embeds: torch.Tensor                # [B, L, D] the positive embeddings (for storing)
    pooled_prompt_embeds: torch.Tensor | None  # [B, P] (SDXL)


class Teacher:
    """A text-to-image latent diffusion teacher (SD1.5/SD2.1 or SDXL shape).

    Build it with :meth:`from_pretrained` (a local diffusers folder), :meth:`from_pipeline` (a
    diffusers pipeline object) or directly from model objects. ``vae_config`` (a dict or config)
    is only needed for the latent/pixel scale factor; the VAE weights are never used.
    ``resolution`` (pixels) defaults to the UNet's sample size times the VAE scale factor.
    """

    def __init__(self, unet, text_encoder, tokenizer, scheduler, *, text_encoder_2=None,
                 tokenizer_2=None, vae_config=None, force_zeros_for_empty_prompt: bool = True,
                 resolution: int | tuple[int, int] | None = None, source: str | None = None):
        self.unet = unet
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
        self.base_scheduler = scheduler
        self.vae_config = clean_config(vae_config) if vae_config is not None else None
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.source = source
        self._unet_forward = unet
        self._channels_last = False
        self._negative_cache: dict = {}
        self._identity: dict | None = None
        if getattr(unet.config, "time_cond_proj_dim", None) is not None:
            raise ValueError("unet: guidance-embedded UNets (time_cond_proj_dim, e.g. LCM) are "
                             "not supported as teachers")
        if self.is_sdxl and getattr(unet.config, "addition_embed_type", None) != "text_time":
            raise ValueError("unet: an SDXL-shaped teacher (two text encoders) needs a UNet with "
                             "addition_embed_type='text_time'")
        blocks = (self.vae_config or {}).get("block_out_channels", [0, 0, 0, 0])
        self.vae_scale_factor = 2 ** (len(blocks) - 1)
        if self.vae_config and self.vae_config.get("latent_channels", unet.config.in_channels) \
                != unet.config.in_channels:
            raise ValueError(f"vae_config: latent_channels {self.vae_config['latent_channels']} "
                             f"differs from the UNet's in_channels {unet.config.in_channels}")
        sample = unet.config.sample_size
        sample = (sample, sample) if isinstance(sample, int) else tuple(sample)
        if resolution is None:
            self.height, self.width = sample[0] * self.vae_scale_factor, \
                sample[1] * self.vae_scale_factor
        else:
            res = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
            if res[0] % self.vae_scale_factor or res[1] % self.vae_scale_factor:
                raise ValueError(f"resolution (--resolution): {res} is not a multiple of the VAE "
                                 f"scale factor {self.vae_scale_factor}")
            self.height, self.width = res

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pipeline(cls, pipe, resolution=None, source: str | None = None) -> "Teacher":
        """From a diffusers ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` (or any
        pipeline with the same component names)."""
        comps = pipe.components
        return cls(comps["unet"], comps.get("text_encoder"), comps.get("tokenizer"),
                   comps["scheduler"], text_encoder_2=comps.get("text_encoder_2"),
                   tokenizer_2=comps.get("tokenizer_2"),
                   vae_config=comps["vae"].config if comps.get("vae") is not None else None,
                   force_zeros_for_empty_prompt=getattr(pipe.config, "force_zeros_for_empty_prompt",
                                                        True),
                   resolution=resolution, source=source)

    @classmethod
    def from_pretrained(cls, path: str, *, dtype="float32", device="cpu",
                        resolution=None) -> "Teacher":
        """From a local diffusers folder (``model_index.json`` with unet/, text_encoder/,
        tokenizer/, scheduler/, vae/ and for SDXL text_encoder_2/, tokenizer_2/). Never downloads:
        every load is ``local_files_only``. The VAE's config is read, its weights are not."""
        import diffusers
        import transformers

        index_file = os.path.join(path, "model_index.json")
        if not os.path.isfile(index_file):
            raise FileNotFoundError(f"teacher (--teacher): {path!r} is not a local diffusers "
                                    f"folder (no model_index.json)")
        with open(index_file, encoding="utf-8") as f:
            index = json.load(f)
        dtype = parse_dtype(dtype)

        def present(name):
            entry = index.get(name)
            return isinstance(entry, (list, tuple)) and entry[0] is not None and \
                os.path.isdir(os.path.join(path, name))

        def load_text_encoder(name):
            cls_name = index[name][1]
            model_cls = getattr(transformers, cls_name)
            return model_cls.from_pretrained(os.path.join(path, name), dtype=dtype,
                                             local_files_only=True).eval()

        def load_tokenizer(name):
            tok_cls = getattr(transformers, index[name][1], transformers.CLIPTokenizer)
            return tok_cls.from_pretrained(os.path.join(path, name), local_files_only=True)

        unet = diffusers.UNet2DConditionModel.from_pretrained(
            path, subfolder="unet", torch_dtype=dtype, local_files_only=True).eval()
        sched_cls = getattr(diffusers, index["scheduler"][1])
        scheduler = sched_cls.from_pretrained(path, subfolder="scheduler", local_files_only=True)
        vae_config = diffusers.AutoencoderKL.load_config(path, subfolder="vae",
                                                         local_files_only=True) \
            if present("vae") else None
        text_encoder = load_text_encoder("text_encoder") if present("text_encoder") else None
        tokenizer = load_tokenizer("tokenizer") if present("tokenizer") else None
        text_encoder_2 = load_text_encoder("text_encoder_2") if present("text_encoder_2") else None
        tokenizer_2 = load_tokenizer("tokenizer_2") if present("tokenizer_2") else None
        teacher = cls(unet, text_encoder, tokenizer, scheduler, text_encoder_2=text_encoder_2,
                      tokenizer_2=tokenizer_2, vae_config=vae_config,
                      force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True),
                      resolution=resolution, source=os.path.abspath(path))
        return teacher.to(device=device, dtype=dtype)

    # ------------------------------------------------------------------ properties
    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one latent, from the UNet and VAE configs."""
        return (int(self.unet.config.in_channels), self.height // self.vae_scale_factor,
                self.width // self.vae_scale_factor)

    def _text_pairs(self):
        pairs = [(self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)]
        return [(t, e) for t, e in pairs if t is not None and e is not None]

    def to(self, device=None, dtype=None) -> "Teacher":
        """Move/cast the UNet and text encoders (in place); returns self."""
        dtype = parse_dtype(dtype) if dtype is not None else None
        for m in (self.unet, self.text_encoder, self.text_encoder_2):
            if m is not None:
                m.to(device=device, dtype=dtype)
        self._negative_cache.clear()
        return self

    def optimize(self, *, channels_last: bool = False, compile: bool = False,
                 compile_mode: str | None = None, fuse_qkv: bool = False,
                 cuda_graphs: bool = False) -> "Teacher":
        """Speed options: channels_last UNet, fused QKV projections, ``torch.compile`` of the
        UNet forward, or CUDA-graph replay of the UNet forward (GPU; one capture per batch
        shape; see :mod:`d2g_fast.teacher.cuda_graph`). PyTorch's SDPA attention is diffusers'
        default processor already."""
        if compile and cuda_graphs:
            raise ValueError("cuda_graphs: choose torch.compile (mode 'reduce-overhead' uses CUDA "
                             "graphs) or cuda_graphs, not both")
        if fuse_qkv and hasattr(self.unet, "fuse_qkv_projections"):
            self.identity()  # of the weights as loaded: fusing adds fused copies to the state
            try:
                self.unet.fuse_qkv_projections()
            except ValueError as exc:  # e.g. added KV projections
                warnings.warn(f"fuse_qkv: not applied ({exc})", RuntimeWarning, stacklevel=2)
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self._channels_last = True
        if compile:
            self._unet_forward = torch.compile(self.unet, mode=compile_mode, fullgraph=False)
        if cuda_graphs:
            from d2g_fast.teacher.cuda_graph import GraphedUNet

            self._unet_forward = GraphedUNet(self.unet)
        return self

    def make_scheduler(self, name: str | None = "ddim"):
        """A scheduler of the named kind ("ddim" by default) from the teacher's scheduler config."""
        return make_scheduler(name, self.base_scheduler.config)

    # ------------------------------------------------------------------ identity
    def identity(self) -> dict:
        """What identifies the teacher: a sha256 over the configs and weights of the UNet and
        text encoders, the tokenizers' vocabularies, the VAE config and the base scheduler
        config. Independent of the device; the weights are hashed in their current dtype."""
        if self._identity is not None:
            return self._identity
        h = hashlib.sha256()

        def add(tag: str, payload: bytes):
            h.update(tag.encode() + b"\0" + len(payload).to_bytes(8, "little"))
            h.update(payload)

        modules = {"unet": self.unet, "text_encoder": self.text_encoder,
                   "text_encoder_2": self.text_encoder_2}
        for name, module in modules.items():
            if module is None:
                continue
            add(name + ".config", json.dumps(clean_config(module.config), sort_keys=True,
                                             default=str).encode())
            for key, tensor in sorted(module.state_dict().items()):
                t = tensor.detach().to("cpu").contiguous()
                add(f"{name}.{key}:{t.dtype}:{tuple(t.shape)}",
                    t.reshape(-1).view(torch.uint8).numpy().tobytes())
        for name, tok in (("tokenizer", self.tokenizer), ("tokenizer_2", self.tokenizer_2)):
            if tok is not None:
                add(name, json.dumps([sorted(tok.get_vocab().items()), tok.model_max_length])
                    .encode())
        add("vae.config", json.dumps(self.vae_config, sort_keys=True, default=str).encode())
        add("scheduler.config", json.dumps(clean_config(self.base_scheduler.config),
                                           sort_keys=True, default=str).encode())
        self._identity = {
            "sha256": h.hexdigest(),
            "kind": "sdxl" if self.is_sdxl else "sd",
            "unet_class": type(self.unet).__name__,
            "prediction_type": self.base_scheduler.config.get("prediction_type", "epsilon"),
            "latent_shape": list(self.latent_shape),
            "resolution": [self.height, self.width],
            "source": self.source,
        }
        return self._identity

    # ------------------------------------------------------------------ prompts
    def max_prompt_tokens(self) -> int:
        return min(t.model_max_length for t, _ in self._text_pairs())

    def count_truncated(self, prompts: list[str]) -> int:
        """How many prompts are longer than the tokenizer limit (they are truncated, as the
        diffusers pipelines do)."""
        from transformers.utils import logging as hf_logging

        over = torch.zeros(len(prompts), dtype=torch.bool)
        # Tokenizing without truncation makes transformers warn about "indexing errors"; we
        # only count here, and truncate when encoding.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            self._count_over(prompts, over)
        finally:
            hf_logging.set_verbosity(verbosity)
        return int(over.sum())

    def _count_over(self, prompts: list[str], over: torch.Tensor) -> None:
        for tok, _ in self._text_pairs():
            for start in range(0, len(prompts), 4096):
                chunk = prompts[start:start + 4096]
                ids = tok(chunk, padding=False, truncation=False)["input_ids"]
                over[start:start + len(chunk)] |= torch.tensor(
                    [len(x) > tok.model_max_length for x in ids])

    def _encode_sd(self, texts: list[str], max_length: int | None = None):
        tok, enc = self.tokenizer, self.text_encoder
        inputs = tok(texts, padding="max_length", max_length=max_length or tok.model_max_length,
                     truncation=True, return_tensors="pt")
        mask = None
        if getattr(enc.config, "use_attention_mask", False):
            mask = inputs.attention_mask.to(self.device)
        return enc(inputs.input_ids.to(self.device), attention_mask=mask)[0], None

    def _encode_sdxl(self, texts: list[str], max_length: int | None = None):
        hidden, pooled = [], None
        for tok, enc in self._text_pairs():
            inputs = tok(texts, padding="max_length",
                         max_length=max_length or tok.model_max_length, truncation=True,
                         return_tensors="pt")
            out = enc(inputs.input_ids.to(self.device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled

    def _encode(self, texts, max_length=None):
        return self._encode_sdxl(texts, max_length) if self.is_sdxl else \
            self._encode_sd(texts, max_length)

    def time_ids(self, n: int) -> torch.Tensor:
        """SDXL's added time ids [n, 6] for this teacher's resolution (no crop), as the
        SDXL pipeline builds them; for a trainer that reads stored prompt embeddings."""
        return self._time_ids(n)

    def _time_ids(self, n: int) -> torch.Tensor:
        ids = [self.height, self.width, 0, 0, self.height, self.width]
        proj_dim = self.text_encoder_2.config.projection_dim
        expected = self.unet.add_embedding.linear_1.in_features
        if self.unet.config.addition_time_embed_dim * len(ids) + proj_dim != expected:
            raise ValueError(f"unet: expects an added embedding of {expected} features, the "
                             f"text encoder and time ids give "
                             f"{self.unet.config.addition_time_embed_dim * len(ids) + proj_dim}")
        return torch.tensor([ids], dtype=self.dtype, device=self.device).repeat(n, 1)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], negative_prompt: str | None = None,
                       guided: bool = True) -> Conditioning:
        """Encode a batch of prompts (and the negative prompt when guided) as the diffusers
        pipelines do: padded/truncated to the tokenizer limit; SDXL takes the penultimate hidden
        states of both encoders and the pooled output of the second, and uses zeros for an
        absent negative prompt when the model asks for it (``force_zeros_for_empty_prompt``)."""
        n = len(prompts)
        embeds, pooled = self._encode(list(prompts))
        embeds = embeds.to(self.dtype)
        pooled = pooled.to(self.dtype) if pooled is not None else None
        added = None
        if not guided:
            if self.is_sdxl:
                added = {"text_embeds": pooled, "time_ids": self._time_ids(n)}
            return Conditioning(embeds, added, embeds, pooled)
        # Encoded at the batch size (cached per size): a batch of one can round differently
        # in the text projection, and we want the pipeline's numbers.
        key = (negative_prompt, n, embeds.shape[1], self.device, self.dtype)
        if key not in self._negative_cache:
            if self.is_sdxl and negative_prompt is None and self.force_zeros_for_empty_prompt:
                neg, neg_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
            else:
                neg, neg_pooled = self._encode([negative_prompt or ""] * n,
                                               max_length=embeds.shape[1])
                neg = neg.to(self.dtype)
                neg_pooled = neg_pooled.to(self.dtype) if neg_pooled is not None else None
            self._negative_cache[key] = (neg, neg_pooled)
        neg, neg_pooled = self._negative_cache[key]
        hidden = torch.cat([neg, embeds])
        if self.is_sdxl:
            time_ids = self._time_ids(n)
            added = {"text_embeds": torch.cat([neg_pooled, pooled]),
                     "time_ids": torch.cat([time_ids, time_ids])}
        return Conditioning(hidden, added, embeds, pooled)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, noise: torch.Tensor, prompts: list[str], *, steps: int = 50,
               guidance: float = 7.5, scheduler=None, negative_prompt: str | None = None,
               generator: torch.Generator | None = None, conditioning: Conditioning | None = None,
               check_finite: bool = True) -> torch.Tensor:
        """Run the sampler from ``noise`` [B, C, h, w] for ``prompts`` (B strings) and return
        the final latents [B, C, h, w] in float32 on the teacher's device (NOT divided by the VAE
        scaling factor: exactly the pipeline's ``output_type="latent"`` result).

        Classifier-free guidance is used when ``guidance > 1`` (the diffusers rule), with the
        unguided and guided halves in one batched UNet call. ``scheduler`` is a diffusers
        scheduler instance or name (default DDIM from the teacher's config); its state is reset
        here. Raises NonFiniteLatentError when the result holds NaN or Inf."""
        if noise.ndim != 4 or tuple(noise.shape[1:]) != self.latent_shape:
            raise ValueError(f"noise: expected shape [B, {', '.join(map(str, self.latent_shape))}]"
                             f", got {list(noise.shape)}")
        if len(prompts) != noise.shape[0]:
            raise ValueError(f"prompts: {len(prompts)} prompts for a batch of {noise.shape[0]}")
        if steps < 1:
            raise ValueError(f"steps (--steps): must be >= 1, got {steps}")
        if scheduler is None or isinstance(scheduler, str):
            scheduler = self.make_scheduler(scheduler or "ddim")
        guided = guidance > 1.0
        cond = conditioning or self.encode_prompts(prompts, negative_prompt, guided)
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
            out = self._unet_forward(model_in, t, encoder_hidden_states=cond.encoder_hidden_states,
                                     added_cond_kwargs=cond.added_cond_kwargs,
                                     return_dict=False)[0].float()
            if guided:
                uncond, text = out.chunk(2)
                out = uncond + guidance * (text - uncond)
            latents = scheduler.step(out, t_step, latents, **extra, return_dict=False)[0]
        if check_finite:
            bad = ~torch.isfinite(latents).flatten(1).all(dim=1)
            if bool(bad.any()):
                rows = bad.nonzero().flatten().tolist()
                raise NonFiniteLatentError(
                    f"the teacher produced NaN/Inf latents for batch rows {rows} "
                    f"(prompts {[prompts[r] for r in rows][:4]}); nothing was stored. Check the "
                    f"teacher weights and --dtype (float16 overflows in some UNets: try bfloat16)")
        return latents

    def warn_if_stochastic(self, scheduler_name: str | None):
        cls_name = type(self.make_scheduler(scheduler_name)).__name__
        if cls_name in STOCHASTIC:
            warnings.warn(f"scheduler {cls_name} draws fresh noise at every step: the pairs are "
                          f"reproducible (seeded per batch) but not a deterministic ODE map",
                          RuntimeWarning, stacklevel=2)
