"""E-LatentLPIPS: a drop-in, faster replacement of ``elatentlpips.ELatentLPIPS``.

Same constructor arguments, forward signature, output shapes and state-dict layout as the
official package (``elatentlpips`` 0.2), so its checkpoints load strictly and its numbers are
reproduced (see tests/test_elatentlpips_parity.py). Differences, all deliberate:

- Nothing is downloaded. ``pretrained=True`` reads local files: ``heads_path`` / ``trunk_path``
  or the folder named by ``D2G_ELATENTLPIPS_DIR``; checkpoints are read with
  ``torch.load(..., weights_only=True)`` (never a full unpickle) or from safetensors.
- Negative weights in the linear heads are clamped to zero at load (with a warning giving the
  count), or rejected with ``negative_weights="error"``. Why: the heads weight squared feature
  differences, so a negative weight lets the "distance" go below zero, and a generator trained
  against it is rewarded for making some feature differences LARGER. The classic LPIPS clamps
  its heads for this reason; the official E-LatentLPIPS does not, and there is an open user
  report of negative loss values with it. Randomly initialised heads are drawn non-negative.
- The random trunk (``pnet_rand=True``) takes the encoder's latent channels (the official
  package builds a 3-channel trunk by mistake in that mode).
- A fast path in eval mode: BatchNorm folded into the convs, channels_last, optional bf16
  compute (``precision="bf16"``), branches that need no gradient (usually the target) run
  without autograd, and the five layer distances go through ONE call of the fused
  ``d2g_fast.ops.lpips_distance_multi`` op (one kernel launch on the GPU, cancellation-free
  math; ``spatial=True`` keeps the per-layer ``lpips_distance`` op for the maps). ``impl="ref"`` runs the plain reference path instead.
- Any latent space: ``encoder`` may be a name outside the five official ones when the weights
  file (ours, safetensors) records its latent channels and normalisation (see
  :mod:`d2g_fast.nn.elatentlpips_io`; ``d2g lpips train-trunk`` / ``calibrate`` write such files),
  or when ``latent_channels`` (and ``normalization``) are passed. ``width_div`` builds a narrower
  trunk (every conv width divided by it), read from the file's metadata too.
- Inputs are checked (type, dtype, shape, channel count, NaN/Inf) with errors naming the
  argument. The NaN/Inf check needs a device sync; ``check_inputs=False`` turns it off, and
  it is skipped under ``torch.compile`` tracing and CUDA-graph capture.
"""
from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from d2g_fast.nn import elatentlpips_io as io
from d2g_fast.nn.elatentlpips_io import heads_filename, trunk_filename  # noqa: F401 (public names)
from d2g_fast.nn.latent_vgg import TAP_CHANNELS, LatentVGG16BN, check_width_div, tap_channels

# Latent channels and the (shift, scale) of ``normalize=True`` per encoder: the VAE's own
# latent scaling, x_model = (x_raw - shift) * scale.
ENCODER_CHANNELS = {"sd15": 4, "sd21": 4, "sdxl": 4, "sd3": 16, "flux": 16}
ENCODER_NORMALIZATION = {
    "sd15": (0.0, 0.18215),
    "sd21": (0.0, 0.18215),
    "sdxl": (0.0, 0.13025),
    "sd3": (0.0609, 1.5305),
    "flux": (0.1159, 0.3611),
}
AUGMENT_PRESETS = ("b", "g", "c", "o", "co", "bg", "bgc", "bgco")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
NEGATIVE_WEIGHT_POLICIES = ("clamp", "error")
from d2g_fast._dispatch import IMPLS  # noqa: E402  (one source: the dispatch rule)
NUM_LAYERS = len(TAP_CHANNELS)
# Inputs smaller than this lose the last tap to the two max-pools.
MIN_SPATIAL = 4
EPS = 1e-8


class LinearHead(nn.Module):
    """The calibrated "lin" layer of one tap: optional dropout, then a 1x1 conv to one channel
    without bias. Child names match the official layout (``model.0`` dropout, ``model.1`` conv;
    ``model.0`` conv without dropout)."""

    def __init__(self, channels: int, use_dropout: bool = True):
        super().__init__()
        conv = nn.Conv2d(channels, 1, kernel_size=1, bias=False)
        # Non-negative random init (a distance needs non-negative channel weights), with the
        # magnitude of PyTorch's default conv init.
        with torch.no_grad():
            conv.weight.uniform_(0.0, channels ** -0.5)
        self.model = nn.Sequential(nn.Dropout(), conv) if use_dropout else nn.Sequential(conv)

    @property
    def conv(self) -> nn.Conv2d:
        return self.model[-1]

    @property
    def weight(self) -> torch.Tensor:
        return self.conv.weight

    def forward(self, diff: torch.Tensor) -> torch.Tensor:
        return self.model(diff)


def _first(*values):
    return next((v for v in values if v is not None), None)


def resolve_latent_spec(encoder: str, files, latent_channels: int | None = None,
                        normalization: tuple[float, float] | None = None,
                        width_div: int | None = None) -> io.LatentSpec:
    """Latent channels, normalisation and trunk width for ``encoder``: the arguments when given,
    else the official table for the five known names, else what the first of our safetensors
    ``files`` records (width: argument, file, 1). A file recording another channel count than a
    known name is then rejected by the loader. ValueError when the channel count is known from
    none of them."""
    recorded = next((s for s in map(io.spec_of_file, files) if s.latent_channels is not None),
                    io.LatentSpec())
    channels = _first(latent_channels, ENCODER_CHANNELS.get(encoder), recorded.latent_channels)
    if channels is None:
        raise ValueError(
            f"ELatentLPIPS: encoder must be one of {tuple(ENCODER_CHANNELS)} or come with a weights "
            f"file that records its latent channels (heads_path= / trunk_path= a d2g_fast "
            f".safetensors file, e.g. from 'd2g lpips calibrate'), or pass latent_channels=; "
            f"got encoder {encoder!r} and no such file")
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
        raise ValueError(f"ELatentLPIPS: latent_channels must be a positive int, got {channels!r}")
    if normalization is None:
        normalization = _first(ENCODER_NORMALIZATION.get(encoder), recorded.normalization)
    if normalization is not None:
        if len(normalization) != 2 or not float(normalization[1]) > 0:
            raise ValueError("ELatentLPIPS: normalization must be (shift, scale) with scale > 0, "
                             f"got {normalization!r}")
        normalization = (float(normalization[0]), float(normalization[1]))
    width = check_width_div(_first(width_div, recorded.width_div, 1), "ELatentLPIPS")
    return io.LatentSpec(encoder, channels, width, normalization)


class ELatentLPIPS(nn.Module):
    """Latent perceptual distance with augmentation ensembling (E-LatentLPIPS).

    Constructor arguments up to ``augment`` have the official meaning and defaults:
    ``pretrained`` loads the calibrated heads (the official tuned file holds the trunk too),
    ``pnet_rand=False`` loads the ImageNet-trained trunk (used when no tuned file is loaded),
    ``pnet_tune`` makes the trunk trainable, ``use_dropout`` puts dropout before the heads
    (active in train mode only), ``eval_mode`` calls ``.eval()``, ``encoder`` picks the latent
    space and ``augment`` the augmentation preset (None for plain LatentLPIPS).

    Extra keyword arguments: ``trunk_path`` / ``heads_path`` (local checkpoint files, official
    ``.pth``/``.pth.tar`` or our ``.safetensors``), ``precision`` ("fp32" or "bf16" compute in
    the fast path), ``channels_last`` (memory format of the fast path; default: with bf16), ``negative_weights``
    ("clamp" or "error"), ``impl`` ("auto" fast path, "ref" reference path, or a backend of
    the distance op), ``check_inputs``, ``tune_heads`` (heads trainable; default: only when
    ``eval_mode=False``, the official module always leaves them trainable), ``augment_sampler``
    (where the augmentation parameters are drawn, see :class:`d2g_fast.nn.PairedAugment`:
    "auto" draws on the GPU for CUDA latents, with no host synchronisation and CUDA-graph safe,
    and on the host otherwise; "host" always reproduces the official pipeline's draws for the
    same CPU seed). ``latent_channels`` / ``normalization`` ((shift, scale) of
    ``normalize=True``) / ``width_div`` override what the encoder name or the weights file
    says (see :func:`resolve_latent_spec`); an encoder name outside the official five needs them
    from one of the two.
    """

    def __init__(self, pretrained: bool = True, net: str = "vgg16", elatentlpips: bool = True,
                 spatial: bool = False, pnet_rand: bool = False, pnet_tune: bool = False,
                 use_dropout: bool = True, eval_mode: bool = True, verbose: bool = True,
                 encoder: str = "sd3", augment: str | None = "bg", *,
                 trunk_path: str | os.PathLike | None = None,
                 heads_path: str | os.PathLike | None = None,
                 precision: str = "fp32", channels_last: bool | None = None,
                 negative_weights: str = "clamp", impl: str = "auto", check_inputs: bool = True,
                 tune_heads: bool | None = None, augment_sampler: str = "auto",
                 latent_channels: int | None = None,
                 normalization: tuple[float, float] | None = None, width_div: int | None = None):
        super().__init__()
        if net not in ("vgg", "vgg16"):
            raise NotImplementedError(f"ELatentLPIPS: net={net!r} is not available; only 'vgg16'")
        if not isinstance(encoder, str) or not encoder:
            raise ValueError(f"ELatentLPIPS: encoder must be a non-empty name, got {encoder!r}")
        if augment is not None and augment not in AUGMENT_PRESETS:
            raise ValueError(f"ELatentLPIPS: augment must be None or one of {AUGMENT_PRESETS}, "
                             f"got {augment!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"ELatentLPIPS: precision must be one of {tuple(PRECISIONS)}, "
                             f"got {precision!r}")
        if negative_weights not in NEGATIVE_WEIGHT_POLICIES:
            raise ValueError(f"ELatentLPIPS: negative_weights must be one of "
                             f"{NEGATIVE_WEIGHT_POLICIES}, got {negative_weights!r}")
        if impl not in IMPLS:
            raise ValueError(f"ELatentLPIPS: impl must be one of {IMPLS}, got {impl!r}")
        from d2g_fast.nn.augment import SAMPLERS  # noqa: PLC0415 (optional piece)
        if augment_sampler not in SAMPLERS:
            raise ValueError(f"ELatentLPIPS: augment_sampler must be one of {SAMPLERS}, "
                             f"got {augment_sampler!r}")

        heads_file = trunk_file = None
        if pretrained and elatentlpips:
            heads_file = heads_path or io.env_checkpoint_path(heads_filename(encoder))
        if not pnet_rand:
            trunk_file = trunk_path or io.env_checkpoint_path(trunk_filename(encoder))
        spec = resolve_latent_spec(encoder, (heads_file, trunk_file), latent_channels,
                                   normalization, width_div)

        self.pnet_type = "vgg16"
        self.pnet_tune = pnet_tune
        self.pnet_rand = pnet_rand
        self.spatial = spatial
        self.elatentlpips = elatentlpips
        self.encoder = encoder
        self.augment_preset = augment
        self.use_dropout = use_dropout
        self.width_div = spec.width_div
        self.chns = list(tap_channels(spec.width_div))
        self.L = NUM_LAYERS
        self.latent_channels = spec.latent_channels
        # (shift, scale) of normalize=True; None when neither the name nor a file tells it.
        self.normalization = spec.normalization
        self.precision = precision
        # channels_last pays off with bf16 (oneDNN / cuDNN tensor-core kernels); fp32 keeps the
        # official layout by default (on the CPU fp32 channels_last measured no faster).
        # None: decided per call from the precision.
        self.channels_last = channels_last
        self.negative_weights = negative_weights
        self.impl = impl
        self.check_inputs = check_inputs
        self.verbose = verbose
        if verbose:
            print(f"Setting up [{'ELatentLPIPS' if elatentlpips else 'baseline'}] perceptual "
                  f"loss: trunk [{net}], spatial [{'on' if spatial else 'off'}], encoder "
                  f"[{encoder}], augment [{augment}], precision [{precision}]")

        self.net = LatentVGG16BN(self.latent_channels, requires_grad=True, width_div=self.width_div)
        if elatentlpips:
            for k, c in enumerate(self.chns):
                self.add_module(f"lin{k}", LinearHead(c, use_dropout=use_dropout))
            # The official module also registers the heads as a ModuleList: the same modules
            # under a second name, so its state dict holds both ``lin<k>.*`` and ``lins.<k>.*``.
            self.lins = nn.ModuleList([getattr(self, f"lin{k}") for k in range(self.L)])
        else:
            self.lins = None
        self.register_load_state_dict_post_hook(ELatentLPIPS._after_load_hook)

        if pretrained and elatentlpips:
            self.load_checkpoint(heads_file or io.checkpoint_path(
                encoder, heads_filename(encoder), "heads_path", "tuned module (trunk + calibrated heads)"))
        elif not pnet_rand:
            self.load_trunk_checkpoint(trunk_file or io.checkpoint_path(
                encoder, trunk_filename(encoder), "trunk_path", "ImageNet-trained latent trunk"))
        self.net.requires_grad_(pnet_tune)
        # Frozen heads in eval mode (the loss use): no head-weight gradient pass per step and no
        # .grad piling up on them. Calibrating the heads is training mode (eval_mode=False).
        if self.lins is not None:
            self.lins.requires_grad_(not eval_mode if tune_heads is None else tune_heads)

        self.augment = None
        if augment is not None:
            from d2g_fast.nn.augment import PairedAugment  # noqa: PLC0415 (optional piece)
            self.augment = PairedAugment(augment, sampler=augment_sampler)
        if eval_mode:
            self.eval()

    # ------------------------------------------------------------------ checkpoints
    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Load a whole-module checkpoint: the official ``*_tuned.pth`` or our safetensors."""
        io.load_checkpoint(self, path)

    def load_trunk_checkpoint(self, path: str | os.PathLike) -> None:
        """Load a trunk strictly: the official ImageNet-classifier checkpoint
        (``*_latent_vgg16.pth.tar``, the classifier head in it is dropped) or our safetensors
        (a trained-trunk file or the trunk part of a module file)."""
        io.load_trunk_checkpoint(self, path)

    def _canonical_heads(self, sd: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
        """Rename head keys to this module's dropout layout and fill both ``lin<k>`` and
        ``lins.<k>`` names (either may be missing in a file)."""
        conv_index = "1" if self.use_dropout else "0"
        out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        heads: dict[int, torch.Tensor] = {}
        for key, value in sd.items():
            parts = key.split(".")
            if parts[0].startswith("lin") and parts[0][3:].isdigit() and parts[-1] == "weight":
                heads.setdefault(int(parts[0][3:]), value)
            elif parts[0] == "lins" and len(parts) > 1 and parts[1].isdigit() and parts[-1] == "weight":
                heads.setdefault(int(parts[1]), value)
            elif key.startswith("augment."):
                continue  # augmentation state (filter taps, probability) is not learned
            else:
                out[key] = value
        if self.lins is not None:
            for k, value in sorted(heads.items()):
                out[f"lin{k}.model.{conv_index}.weight"] = value
                out[f"lins.{k}.model.{conv_index}.weight"] = value
        elif heads:
            raise KeyError("ELatentLPIPS(elatentlpips=False) has no linear heads, but the state "
                           f"dict holds head weights for layers {sorted(heads)}")
        return out

    def load_official_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True):
        """Load an official ``ELatentLPIPS.state_dict()`` (any dropout layout, with or without
        ``module.`` prefixes and ``augment.*`` buffers)."""
        sd = self._canonical_heads(io.strip_module_prefix(state_dict))
        return self.load_state_dict(sd, strict=strict)

    def official_state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        """This module's weights in the official layout (without augmentation buffers)."""
        return OrderedDict((k, v) for k, v in self.state_dict().items() if not k.startswith("augment."))

    def save_safetensors(self, path: str | os.PathLike, **extra_metadata) -> None:
        """Save trunk and heads as safetensors, with the latent channels, width and
        normalisation in the metadata (see :mod:`d2g_fast.nn.elatentlpips_io`)."""
        io.save_module_safetensors(self, path, **extra_metadata)

    def load_safetensors(self, path: str | os.PathLike, strict: bool = True):
        """Load a file written by :meth:`save_safetensors`."""
        return io.load_module_safetensors(self, path, strict=strict)

    @classmethod
    def from_safetensors(cls, path: str | os.PathLike, **kwargs) -> "ELatentLPIPS":
        """Build a module from our safetensors module file: encoder name, latent channels, width
        and normalisation come from its metadata (keyword arguments override)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ELatentLPIPS.from_safetensors: file not found: {str(path)!r}")
        meta = io.read_safetensors_metadata(path)
        spec = io.spec_from_metadata(meta)
        kwargs.setdefault("encoder", spec.encoder or "sd15")
        kwargs.setdefault("verbose", False)
        kwargs.setdefault("elatentlpips", meta.get("elatentlpips", "1") == "1")
        kwargs.setdefault("latent_channels", spec.latent_channels)
        kwargs.setdefault("normalization", spec.normalization)
        kwargs.setdefault("width_div", spec.width_div)
        model = cls(pretrained=False, pnet_rand=True, **kwargs)
        model.load_safetensors(path)
        return model

    @staticmethod
    def _after_load_hook(module: "ELatentLPIPS", incompatible_keys) -> None:
        module.enforce_nonnegative_heads(source="load_state_dict")

    def enforce_nonnegative_heads(self, source: str = "") -> int:
        """Clamp negative head weights to zero (or raise, with ``negative_weights="error"``).
        Returns how many weights were negative."""
        if self.lins is None:
            return 0
        counts = [int((lin.weight < 0).sum()) for lin in self.lins]
        total = sum(counts)
        if total == 0:
            return 0
        where = ", ".join(f"lin{k}: {n}" for k, n in enumerate(counts) if n)
        if self.negative_weights == "error":
            raise ValueError(
                f"ELatentLPIPS: {total} negative linear-head weights ({where}) after {source}. "
                "Negative weights let the distance go below zero; use negative_weights='clamp' "
                "to clamp them to zero.")
        with torch.no_grad():
            for lin in self.lins:
                lin.weight.clamp_(min=0.0)
        warnings.warn(f"ELatentLPIPS: clamped {total} negative linear-head weights to zero "
                      f"({where}) after {source}; negative weights let the distance go below "
                      "zero (negative_weights='error' rejects them instead)", stacklevel=3)
        return total

    # ------------------------------------------------------------------ forward
    def _validate(self, in0, in1) -> None:
        for name, x in (("in0", in0), ("in1", in1)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"ELatentLPIPS: {name} must be a torch.Tensor, got {type(x).__name__}")
            if not x.is_floating_point():
                raise TypeError(f"ELatentLPIPS: {name} must be a floating-point tensor, got {x.dtype}")
            if x.dim() != 4:
                raise ValueError(f"ELatentLPIPS: {name} must be a 4-D latent batch (N, C, H, W), "
                                 f"got shape {tuple(x.shape)}")
            if x.shape[1] != self.latent_channels:
                raise ValueError(f"ELatentLPIPS: {name} has {x.shape[1]} channels but encoder "
                                 f"{self.encoder!r} latents have {self.latent_channels}")
            if x.shape[0] == 0 or x.shape[2] < MIN_SPATIAL or x.shape[3] < MIN_SPATIAL:
                raise ValueError(f"ELatentLPIPS: {name} must have N >= 1 and H, W >= {MIN_SPATIAL}, "
                                 f"got shape {tuple(x.shape)}")
        if in0.shape != in1.shape:
            raise ValueError(f"ELatentLPIPS: in0 and in1 must have the same shape, got "
                             f"{tuple(in0.shape)} and {tuple(in1.shape)}")
        if in0.device != in1.device:
            raise ValueError(f"ELatentLPIPS: in0 and in1 must be on the same device, got "
                             f"{in0.device} and {in1.device}")
        if self.check_inputs and not torch.compiler.is_compiling() and not (
                in0.is_cuda and torch.cuda.is_current_stream_capturing()):
            # One read of each input and one sync: a sum is NaN/Inf whenever an element is (the
            # loss would be NaN anyway; this names the culprit). Only when it is not finite
            # (or overflowed) is each input checked element-wise, to name it.
            if not torch.isfinite(in0.sum() + in1.sum()).item():
                for name, x in (("in0", in0), ("in1", in1)):
                    if not torch.isfinite(x).all():
                        raise ValueError(f"ELatentLPIPS: {name} contains NaN or Inf values")

    def _head_weights(self, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
        if self.lins is not None:
            return [lin.weight.view(-1) for lin in self.lins]
        return [torch.ones(c, dtype=dtype, device=device) for c in self.chns]

    def _features(self, x: torch.Tensor, fast: bool, compute_dtype: torch.dtype):
        # A branch that needs no gradient (usually the target) runs without autograd: no
        # graph, no saved activations.
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.net.parameters()))
        with torch.set_grad_enabled(needs_grad):
            if fast:
                channels_last = (compute_dtype == torch.bfloat16 if self.channels_last is None
                                 else bool(self.channels_last))
                return self.net.fast_features(x, dtype=compute_dtype, channels_last=channels_last)
            # Reference / train-mode trunk: the layers as they are, in the parameters' dtype.
            return self.net(x.to(self.net.slice1[0].weight.dtype))

    def _reference_distance(self, f0: torch.Tensor, f1: torch.Tensor, k: int) -> torch.Tensor:
        """Per-layer map (N, 1, h, w) written out op by op (dropout included)."""
        n0 = f0 / torch.sqrt(f0.square().sum(dim=1, keepdim=True) + EPS)
        n1 = f1 / torch.sqrt(f1.square().sum(dim=1, keepdim=True) + EPS)
        diff = (n0 - n1).square()
        if self.lins is None:
            return diff.sum(dim=1, keepdim=True)
        return self.lins[k](diff)

    def forward(self, in0: torch.Tensor, in1: torch.Tensor, retPerLayer: bool = False,
                normalize: bool = False, ensembling: bool = True, add_l1_loss: bool = True,
                *, debug_percentile: float | None = None):
        """Distance between latent batches ``in0`` and ``in1`` (N, C, H, W).

        Returns (N, 1, 1, 1), or (N, 1, H, W) maps with ``spatial=True``; with ``retPerLayer``
        the pair (total, list of the five per-layer terms). ``normalize=True`` applies the
        encoder's latent scaling to raw VAE latents; ``add_l1_loss`` adds the per-sample mean
        |in0 - in1| (taken before augmentation); ``ensembling`` applies the augmentation
        (``debug_percentile`` fixes its random draws, for testing).
        """
        self._validate(in0, in1)
        if normalize:
            if self.normalization is None:
                raise ValueError(f"ELatentLPIPS: normalize=True needs the VAE normalisation of "
                                 f"encoder {self.encoder!r}, which no weights file recorded; pass "
                                 "normalization=(shift, scale) when building the module")
            shift, scale = self.normalization
            in0 = (in0 - shift) * scale if shift else in0 * scale
            in1 = (in1 - shift) * scale if shift else in1 * scale

        l1 = None
        if add_l1_loss:
            l1 = (in0 - in1).abs().mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)

        if ensembling:
            if self.augment is None:
                raise ValueError("ELatentLPIPS: ensembling=True needs an augmentation; construct "
                                 "with augment=<preset> or call with ensembling=False")
            if debug_percentile is None:
                in0, in1 = self.augment(in0, in1)
            else:
                in0, in1 = self.augment(in0, in1, debug_percentile=debug_percentile)

        out_hw = in0.shape[2:]
        dropout_active = self.training and self.use_dropout and self.lins is not None
        trunk_fast = self.impl != "ref" and not self.net.training
        distance_fast = self.impl != "ref" and not dropout_active
        if in0.dtype == torch.float64 and self.precision == "fp32":
            compute_dtype = torch.float64
        else:
            compute_dtype = PRECISIONS[self.precision]

        feats0 = self._features(in0, trunk_fast, compute_dtype)
        feats1 = self._features(in1, trunk_fast, compute_dtype)

        res = []
        if distance_fast and not self.spatial:
            # All five layers in one call (one launch on the GPU), cancellation-free when the
            # two inputs are close (a converging loss).
            from d2g_fast import ops  # noqa: PLC0415
            weights = [w.to(f.dtype) if f.dtype == torch.float64 else w
                       for w, f in zip(self._head_weights(feats0[0].dtype, feats0[0].device), feats0)]
            dist = ops.lpips_distance_multi(list(feats0), list(feats1), weights, impl=self.impl)
            res = [d.view(-1, 1, 1, 1) for d in dist.unbind(0)]
        elif distance_fast:
            from d2g_fast.ops import lpips_distance  # noqa: PLC0415
            weights = self._head_weights(feats0[0].dtype, feats0[0].device)
            for k in range(self.L):
                w = weights[k].to(feats0[k].dtype) if feats0[k].dtype == torch.float64 else weights[k]
                d = lpips_distance(feats0[k], feats1[k], w, spatial=self.spatial, impl=self.impl)
                res.append(d if self.spatial else d.view(-1, 1, 1, 1))
        else:
            for k in range(self.L):
                m = self._reference_distance(feats0[k], feats1[k], k)
                res.append(m if self.spatial else m.mean(dim=(2, 3), keepdim=True))
        if self.spatial:
            res = [F.interpolate(r, size=out_hw, mode="bilinear", align_corners=False) for r in res]

        val = res[0]
        for r in res[1:]:
            val = val + r
        if l1 is not None:
            val = val + l1.to(val.dtype)
        return (val, res) if retPerLayer else val

    def extra_repr(self) -> str:
        return (f"encoder={self.encoder!r}, latent_channels={self.latent_channels}, "
                f"width_div={self.width_div}, augment={self.augment_preset!r}, "
                f"elatentlpips={self.elatentlpips}, spatial={self.spatial}, "
                f"precision={self.precision!r}, channels_last={self.channels_last}, impl={self.impl!r}")
