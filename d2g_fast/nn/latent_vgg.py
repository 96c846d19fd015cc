"""The latent VGG16-BN trunk of (E-)LatentLPIPS, with a fast inference path.

Architecture (paper notes, section 2): torchvision's ``vgg16_bn`` ``features`` with the first
conv taking the VAE's latent channels and the first three max-pools replaced by identity.
Features are tapped after ``features`` indices 7, 14, 24, 34 and 44, i.e. after relu1_2,
relu2_2, relu3_3, relu4_3 + pool4 and relu5_3 + pool5 (64, 128, 256, 512, 512 channels).

State-dict layout: ``slice1`` .. ``slice5`` are ``nn.Sequential`` whose children are named by
their index in ``features`` (``slice1.0.weight``, ``slice2.8.running_mean``, ...), so the
module loads strictly from the ``net.*`` entries of the official tuned checkpoint, and
:func:`trunk_state_dict_from_classifier` maps the official ImageNet-classifier checkpoint
(``[module.]model.features.<i>.*``) onto it.

Fast path (:meth:`LatentVGG16BN.fast_features`), used in eval mode:
  - every BatchNorm is folded into the conv before it (one conv + bias + ReLU per stage);
  - the folded weights are cached per (device, dtype, memory format) and rebuilt when any
    parameter or buffer changes in place (tracked through tensor version counters);
  - optional channels_last memory format and bfloat16 compute (fp32 stays the default);
  - on the CPU (oneDNN), bf16/fp32: each ReLU runs inside its convolution (oneDNN's ReLU
    post-op, ``torch.ops.mkldnn._convolution_pointwise``), and a branch that needs an input
    gradient runs the whole trunk as ONE autograd function (:class:`_FusedTrunk`) whose backward
    is the convolutions' data gradients (each a forward convolution with the flipped, transposed
    weights, so a tap's gradient is added by the convolution's "add" post-op), the ReLU masks
    (in place, from the saved outputs) and the two pool backwards: no separate ReLU pass, no
    gradient zero-fill or accumulation. Same numbers as the unfused path (tested); ``fused=False``
    or ``D2G_FUSED_TRUNK=0`` selects the unfused path (see :func:`fused_trunk_supported`).

Width option: ``width_div`` (1, 2, 4 or 8) divides every conv width, so the taps have
``tap_channels(width_div)`` channels. 1 is the official layout (about 15 M parameters); narrow
trunks are for small latent worlds where the weights must stay small (width_div=8: ~0.23 M).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

# torchvision's VGG16 configuration "D": numbers are conv widths, "M" a 2x2 max-pool.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# ``features`` indices where the five slices end (exclusive), i.e. the feature taps.
SLICE_ENDS = (7, 14, 24, 34, 44)
TAP_CHANNELS = (64, 128, 256, 512, 512)
# Allowed divisors of every conv width (all VGG widths are multiples of 8).
WIDTH_DIVS = (1, 2, 4, 8)
# The first three max-pools are identities in the latent trunk (latents are already 8x smaller
# than pixels); pools 4 and 5 stay.
NUM_REMOVED_POOLS = 3
NUM_FEATURES = 44


def check_width_div(width_div: int, where: str = "LatentVGG16BN") -> int:
    """``width_div`` if it is one of :data:`WIDTH_DIVS`, else a ValueError naming it."""
    if isinstance(width_div, bool) or width_div not in WIDTH_DIVS:
        raise ValueError(f"{where}: width_div must be one of {WIDTH_DIVS}, got {width_div!r}")
    return int(width_div)


def tap_channels(width_div: int = 1) -> tuple[int, ...]:
    """Channels of the five taps for a trunk whose conv widths are divided by ``width_div``."""
    check_width_div(width_div, "tap_channels")
    return tuple(c // width_div for c in TAP_CHANNELS)


def build_latent_vgg16_bn_layers(in_channels: int, width_div: int = 1) -> list[nn.Module]:
    """The 44 ``features`` layers of the latent VGG16-BN, in torchvision's order, with every
    conv width divided by ``width_div``."""
    check_width_div(width_div)
    layers: list[nn.Module] = []
    channels = in_channels
    pools_seen = 0
    for item in VGG16_CFG:
        if item == "M":
            pools_seen += 1
            layers.append(nn.Identity() if pools_seen <= NUM_REMOVED_POOLS
                          else nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            width = item // width_div
            conv = nn.Conv2d(channels, width, kernel_size=3, padding=1)
            # torchvision's VGG initialisation, so random trunks behave like torchvision ones.
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            channels = width
    assert len(layers) == NUM_FEATURES
    return layers


def _tensor_versions(tensors) -> tuple:
    return tuple((t.data_ptr(), t._version) for t in tensors)


# ------------------------------------------------------------------ fused CPU trunk
FUSED_DTYPES = (torch.float32, torch.bfloat16)
FUSED_ENV = "D2G_FUSED_TRUNK"  # "0" turns the fused CPU trunk off (auto otherwise)
_CONV_ARGS = ([1, 1], [1, 1], [1, 1], 1)  # padding, stride, dilation, groups of every VGG conv


def fused_trunk_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fused CPU trunk can run: a CPU tensor in fp32/bf16, oneDNN present and enabled,
    torch's ``mkldnn._convolution_pointwise`` op registered, and ``D2G_FUSED_TRUNK`` not "0".
    It needs no AMX: without it oneDNN runs the same fused kernels on AVX-512 / AVX2."""
    return (device.type == "cpu" and dtype in FUSED_DTYPES
            and os.environ.get(FUSED_ENV, "1") != "0"
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))


def _conv_relu(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """relu(conv2d(h, w, b, padding=1)) in one oneDNN call (ReLU as the conv's post-op)."""
    return torch.ops.mkldnn._convolution_pointwise(h, w, b, *_CONV_ARGS, "relu", [], "")


def _conv_data_grad(g: torch.Tensor, w_t: torch.Tensor, tap_grad: torch.Tensor | None) -> torch.Tensor:
    """Gradient w.r.t. a 3x3 / stride 1 / padding 1 conv's input: the forward conv of the output
    gradient ``g`` with ``w_t`` (the weight flipped in H, W and with in/out channels swapped),
    plus ``tap_grad`` (the gradient reaching that input from a tap) through the "add" post-op."""
    if tap_grad is None:
        return torch.ops.mkldnn._convolution_pointwise(g, w_t, None, *_CONV_ARGS, "none", [], "")
    return torch.ops.mkldnn._convolution_pointwise.binary(
        g, tap_grad, w_t, None, *_CONV_ARGS, "add", None, None, [], None)


def _relu_mask_(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """g *= (y > 0) in place (y the ReLU output): the ReLU backward without a new tensor."""
    return torch.ops.aten.threshold_backward.grad_input(g, y, 0, grad_input=g)


def _trunk_plan(layers) -> list[str]:
    """The fast path's steps in order: "conv" (conv + ReLU), "pool" and "tap" (a feature tap)."""
    plan = []
    for block in layers:
        for layer in block:
            if isinstance(layer, nn.Conv2d):
                plan.append("conv")
            elif isinstance(layer, nn.MaxPool2d):
                plan.append("pool")
        plan.append("tap")
    return plan


class _FusedTrunk(torch.autograd.Function):
    """The folded trunk on the CPU with a hand-written backward (see the module docstring).

    ``apply(x, plan, weights, flipped)``: ``x`` already in the compute dtype and layout,
    ``weights`` the folded (w, b) pairs, ``flipped`` the data-gradient weights. Returns the taps.
    The weights take no gradient (the caller uses the autograd path when they need one)."""

    @staticmethod
    def forward(ctx, x, plan, weights, flipped):
        saved, taps, h, k = [], [], x, 0
        for step in plan:
            if step == "conv":
                w, b = weights[k]
                h = _conv_relu(h, w, b)
                saved.append(h)
                k += 1
            elif step == "pool":
                h, indices = torch.ops.aten.max_pool2d_with_indices(h, [2, 2], [2, 2])
                saved.append(indices)
            else:
                taps.append(h)
        ctx.plan, ctx.flipped = plan, flipped
        ctx.memory_format = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
                             and not x.is_contiguous() else torch.contiguous_format)
        ctx.save_for_backward(*saved)
        return tuple(taps)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *tap_grads):
        saved = list(ctx.saved_tensors)
        plan, flipped, fmt = ctx.plan, ctx.flipped, ctx.memory_format
        t = len(tap_grads)  # taps not yet consumed: tap_grads[:t]
        k = len(flipped)    # convs not yet walked back: flipped[:k]
        g, owned = None, False  # gradient w.r.t. the current step's output; ours to overwrite?
        i = len(plan) - 1
        while i >= 0:
            step = plan[i]
            if step == "tap":
                t -= 1
                tg = tap_grads[t].to(flipped[0].dtype, memory_format=fmt)
                g, owned = (tg, False) if g is None else (g + tg, True)
            elif step == "pool":
                indices = saved.pop()
                g = torch.ops.aten.max_pool2d_with_indices_backward(
                    g, saved[-1], [2, 2], [2, 2], [0, 0], [1, 1], False, indices)
                owned = True
            else:
                y = saved.pop()
                g = _relu_mask_(g if owned else g.clone(), y)
                k -= 1
                tap_grad = None
                if i > 0 and plan[i - 1] == "tap":
                    # The tap is this conv's input: its gradient joins through the add post-op.
                    t -= 1
                    tap_grad = tap_grads[t].to(g.dtype, memory_format=fmt)
                    i -= 1
                g, owned = _conv_data_grad(g, flipped[k], tap_grad), True
            i -= 1
        return g, None, None, None


class LatentVGG16BN(nn.Module):
    """Latent VGG16-BN trunk returning the five LPIPS feature taps.

    ``forward`` runs the layers as they are (BatchNorm in train or eval mode, autograd through
    everything); :meth:`fast_features` is the folded inference path.
    """

    def __init__(self, in_channels: int = 4, requires_grad: bool = False, width_div: int = 1):
        super().__init__()
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"LatentVGG16BN: in_channels must be a positive int, got {in_channels!r}")
        self.in_channels = in_channels
        self.width_div = check_width_div(width_div)
        self.tap_channels = tap_channels(width_div)
        layers = build_latent_vgg16_bn_layers(in_channels, width_div)
        start = 0
        for k, end in enumerate(SLICE_ENDS, start=1):
            block = nn.Sequential(OrderedDict((str(i), layers[i]) for i in range(start, end)))
            self.add_module(f"slice{k}", block)
            start = end
        self.requires_grad_(requires_grad)
        self._fold_cache: dict = {}

    @property
    def slices(self) -> tuple[nn.Sequential, ...]:
        return (self.slice1, self.slice2, self.slice3, self.slice4, self.slice5)

    def layers(self) -> list[nn.Module]:
        """The 44 layers in ``features`` order."""
        return [m for s in self.slices for m in s]

    # ------------------------------------------------------------------ reference path
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        taps = []
        h = x
        for block in self.slices:
            h = block(h)
            taps.append(h)
        return tuple(taps)

    # ------------------------------------------------------------------ fast path
    def _conv_bn_pairs(self) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
        layers = self.layers()
        return [(layers[i], layers[i + 1]) for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)]

    def _fold(self, dtype: torch.dtype, channels_last: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Folded (weight, bias) per conv: conv(x, w) * s + (b - mean) * s + beta with
        s = gamma / sqrt(var + eps). Computed in float64 and rounded once to ``dtype``."""
        folded = []
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        for conv, bn in self._conv_bn_pairs():
            scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
            w = conv.weight.double() * scale.view(-1, 1, 1, 1)
            b = (conv.bias.double() - bn.running_mean.double()) * scale + bn.bias.double()
            folded.append((w.to(dtype).contiguous(memory_format=memory_format), b.to(dtype)))
        return folded

    def _flip(self, dtype: torch.dtype, channels_last: bool) -> list[torch.Tensor]:
        """Data-gradient weights of the fused trunk: each folded weight flipped in H, W with its
        in/out channels swapped (the conv whose forward is the original's input gradient)."""
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        return [w.flip(2, 3).transpose(0, 1).contiguous(memory_format=memory_format)
                for w, _ in self.folded_weights(dtype, channels_last)]

    def folded_weights(self, dtype: torch.dtype = torch.float32, channels_last: bool = False):
        """Folded weights for the fast path; cached unless the trunk is being tuned."""
        return self._cached("fold", self._fold, dtype, channels_last)

    def flipped_weights(self, dtype: torch.dtype = torch.float32, channels_last: bool = False):
        """:meth:`_flip` of the folded weights, cached like them."""
        return self._cached("flip", self._flip, dtype, channels_last)

    def _cached(self, what: str, build, dtype: torch.dtype, channels_last: bool):
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            # pnet_tune: fold inside the autograd graph so gradients reach conv and BN params.
            return build(dtype, channels_last)
        params = list(self.parameters()) + list(self.buffers())
        key = (what, params[0].device, dtype, channels_last)
        if torch.compiler.is_compiling():
            # Version counters are invisible to the compiler: use the cache as it stands (call
            # invalidate_fold_cache() after changing trunk weights of a compiled model).
            hit = self._fold_cache.get(key)
            return hit[1] if hit is not None else build(dtype, channels_last)
        versions = _tensor_versions(params)
        hit = self._fold_cache.get(key)
        if hit is None or hit[0] != versions:
            with torch.no_grad():
                hit = (versions, build(dtype, channels_last))
            self._fold_cache[key] = hit
        return hit[1]

    def invalidate_fold_cache(self) -> None:
        self._fold_cache.clear()

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .half() make new parameter tensors: start the cache afresh.
        self._fold_cache = {}
        return super()._apply(fn, *args, **kwargs)

    def fast_features(self, x: torch.Tensor, *, dtype: torch.dtype = torch.float32,
                      channels_last: bool = False, fused: bool | None = None) -> tuple[torch.Tensor, ...]:
        """The five taps with BatchNorm folded (eval-mode semantics), computed in ``dtype``.

        Tap tensors are in ``dtype`` and, with ``channels_last``, in channels_last layout.
        ``fused``: run the fused CPU trunk (None: when :func:`fused_trunk_supported`, the trunk
        weights take no gradient and no compiler is tracing).
        """
        if self.training:
            raise RuntimeError("LatentVGG16BN.fast_features folds BatchNorm with its running "
                               "statistics and needs eval mode; call .eval() or use forward()")
        # One conversion of the input: dtype and layout in the same copy.
        h = x.to(dtype, memory_format=torch.channels_last if channels_last else torch.preserve_format)
        tuned = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        if fused is None:
            fused = (not tuned and not torch.compiler.is_compiling()
                     and fused_trunk_supported(x.device, dtype))
        if fused:
            if tuned:
                raise RuntimeError("LatentVGG16BN.fast_features: fused=True needs trunk weights "
                                   "that take no gradient (pnet_tune uses the autograd path)")
            return self._fused_features(h, dtype, channels_last)
        weights = iter(self.folded_weights(dtype, channels_last))
        taps = []
        for block in self.slices:
            for layer in block:
                if isinstance(layer, nn.Conv2d):
                    w, b = next(weights)
                    # In place is safe: the conv backward does not need its output.
                    h = F.relu(F.conv2d(h, w, b, padding=1), inplace=True)
                elif isinstance(layer, nn.MaxPool2d):
                    h = F.max_pool2d(h, kernel_size=2, stride=2)
                # BatchNorm is folded, ReLU fused above, Identity skipped.
            taps.append(h)
        return tuple(taps)

    def _fused_features(self, h: torch.Tensor, dtype: torch.dtype,
                        channels_last: bool) -> tuple[torch.Tensor, ...]:
        weights = self.folded_weights(dtype, channels_last)
        plan = _trunk_plan(self.slices)
        if torch.is_grad_enabled() and h.requires_grad:
            return _FusedTrunk.apply(h, plan, weights, self.flipped_weights(dtype, channels_last))
        taps, k = [], 0
        for step in plan:
            if step == "conv":
                h = _conv_relu(h, *weights[k])
                k += 1
            elif step == "pool":
                h = F.max_pool2d(h, kernel_size=2, stride=2)
            else:
                taps.append(h)
        return tuple(taps)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}" + (
            f", width_div={self.width_div}" if self.width_div != 1 else "")


def _strip_prefix(key: str, prefix: str) -> str:
    return key[len(prefix):] if key.startswith(prefix) else key


def trunk_state_dict_from_classifier(state_dict: Mapping[str, torch.Tensor],
                                     num_features: int = NUM_FEATURES) -> "OrderedDict[str, torch.Tensor]":
    """Map the official classifier checkpoint's ``state_dict`` onto :class:`LatentVGG16BN` keys.

    Accepts keys ``[module.]model.features.<i>.<name>`` (``module.`` from DataParallel) and
    drops ``model.classifier.*`` (the ImageNet head is not part of the perceptual trunk).
    Any other key is an error, so a wrong file fails loudly instead of half-loading.
    """
    boundaries = (0,) + SLICE_ENDS
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    unexpected = []
    for key, value in state_dict.items():
        k = _strip_prefix(key, "module.")
        k = _strip_prefix(k, "model.")
        if k.startswith("classifier."):
            continue
        if not k.startswith("features."):
            unexpected.append(key)
            continue
        index_str, _, name = k[len("features."):].partition(".")
        if not index_str.isdigit() or int(index_str) >= num_features:
            unexpected.append(key)
            continue
        index = int(index_str)
        slice_id = next(s for s in range(1, 6) if boundaries[s - 1] <= index < boundaries[s])
        out[f"slice{slice_id}.{index}.{name}"] = value
    if unexpected:
        raise KeyError(f"trunk checkpoint: unexpected keys {unexpected[:8]}"
                       f"{' ...' if len(unexpected) > 8 else ''}; expected "
                       "'[module.]model.features.<i>.*' and 'model.classifier.*'")
    return out


def trunk_state_dict_to_classifier(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """Inverse of :func:`trunk_state_dict_from_classifier` for the features part
    (``slice<k>.<i>.<name>`` -> ``model.features.<i>.<name>``)."""
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for key, value in state_dict.items():
        head, _, rest = key.partition(".")
        if not head.startswith("slice"):
            raise KeyError(f"trunk state dict: unexpected key {key!r}")
        out[f"model.features.{rest}"] = value
    return out
