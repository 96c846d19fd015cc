"""Per-sample parameters of the paired latent augmentation (the ADA pipeline of E-LatentLPIPS).

One :class:`AugmentParams` describes ONE random transform per sample, applied identically to the
generated and the target latent by :func:`d2g_fast.ops.paired_augment`:

* geometric (presets ``b`` and ``g``): one inverse 3x3 homogeneous matrix per sample, mapping an
  output pixel (centred coordinates) to the input pixel it samples, plus the reflect-padding
  margins, which the pipeline computes over the whole batch;
* colour (preset ``c``): brightness offset, contrast factor, saturation factor per sample;
* cutout (preset ``o``): centre and size of the zeroed rectangle per sample.

Sampling follows the draw order of the StyleGAN2-ADA / E-LatentLPIPS pipeline with every
probability multiplier at ``p`` (1 by default), so that with the default CPU generator seeded
identically the same transform is drawn: at float32 as the pipeline on float32 latents, or at
float64 (``dtype=torch.float64``) as the pipeline run in float64.  ``debug_percentile``
reproduces the official deterministic mode; in addition every colour draw equals the
percentile (the official colour draws ignore it).

:meth:`AugmentParams.sample_on_device` draws the same distributions on the latents' device
instead (op ``augment_params_sample_on_device_``: a counter-based Philox RNG, one kernel
launch, no host synchronisation, CUDA-graph safe), keeping only the packed tensor; the draws
differ from the host ones (another RNG).  :meth:`AugmentParams.to_host` rebuilds the host
fields from it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# Letters of the presets: b = blit (x-flip, 90-degree rotation, integer translation),
# g = general geometry (isotropic scale, rotation, anisotropic scale, fractional translation),
# c = colour (brightness, contrast, saturation), o = cutout.
PRESET_LETTERS = "bgco"
OFFICIAL_PRESETS = ("b", "g", "c", "o", "co", "bg", "bgc", "bgco")

# Hyper-parameters of the ADA pipeline (defaults of StyleGAN2-ADA, used by E-LatentLPIPS).
XINT_MAX = 0.125     # integer translation range, relative to the image size
SCALE_STD = 0.2      # log2 std of the isotropic scale
ROTATE_MAX = 1.0     # rotation range, 1 = full circle
ANISO_STD = 0.2      # log2 std of the anisotropic scale
XFRAC_STD = 0.125    # std of the fractional translation, relative to the image size
CUTOUT_SIZE = 0.5    # cutout rectangle size, relative to the image size

# Half the support (in input pixels) of the 12-tap resampling filter: the pipeline pads by
# twice this (6 pixels) beyond the transformed corners.
FILTER_PAD = 3

# Columns of the packed parameter tensor (AugmentParams.packed): sampling affine (0-5),
# brightness offset (6), contrast (7), saturation (8), cutout centre x, y (9, 10), cutout
# half-size x, y (11, 12), batch reflect-padding margins x0, y0, x1, y1 (13-16).
PACKED_COLUMNS = 17
MARGIN_COLUMNS = slice(13, 17)
# Preset letters as the bits of the sampler op's preset_flags.
PRESET_BITS = {"b": 1, "g": 2, "c": 4, "o": 8}


def parse_preset(preset: str) -> str:
    """Validate a preset string such as ``"bg"`` and return it in canonical letter order."""
    if not isinstance(preset, str) or not preset:
        raise ValueError(f"preset must be a non-empty string of letters from {PRESET_LETTERS!r}, "
                         f"got {preset!r}")
    unknown = sorted(set(preset) - set(PRESET_LETTERS))
    if unknown:
        raise ValueError(f"preset {preset!r} has unknown letters {unknown}; allowed letters are "
                         f"{PRESET_LETTERS!r} (b=blit, g=geometry, c=colour, o=cutout)")
    if len(set(preset)) != len(preset):
        raise ValueError(f"preset {preset!r} repeats a letter")
    return "".join(ch for ch in PRESET_LETTERS if ch in preset)


# --- the host sampler: draws in the pipeline's order, one named step per transform -------------
#
# Every step draws from torch's generator (in the official order) and does its tiny per-sample
# arithmetic in numpy at the sampler's precision: on a batch of 16 a step costs microseconds
# instead of a torch op each.  The official pipeline computes in torch's default dtype, so its
# float64 run (torch.set_default_dtype(torch.float64)) draws float64 numbers: ``dtype`` selects
# which of the two runs is reproduced.

_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


class _Draws:
    """Random draws and constants of one :meth:`AugmentParams.sample` call."""

    def __init__(self, n: int, h: int, w: int, generator, dtype: torch.dtype, p: float,
                 debug_percentile: float | None):
        self.n, self.h, self.w = n, h, w
        self.generator, self.dtype = generator, dtype
        self.ft = _NUMPY_DTYPES[dtype]
        self.prob = self.ft(p)
        # The official pipeline holds debug_percentile as a float32 tensor in both precisions:
        # the values derived from it are computed by the same torch float32 ops, then widened.
        self.pct = (None if debug_percentile is None
                    else torch.tensor(float(debug_percentile), dtype=torch.float32))

    def rand(self, *shape) -> np.ndarray:
        return torch.rand(*shape, generator=self.generator, dtype=self.dtype).numpy()

    def randn(self, *shape) -> np.ndarray:
        return torch.randn(*shape, generator=self.generator, dtype=self.dtype).numpy()

    def gated(self, value: np.ndarray, identity: float, prob=None, gate_shape=None) -> np.ndarray:
        """``value`` where a uniform draw (one per row, shape ``gate_shape``) is below the
        probability, else ``identity``: the pipeline's ``torch.where(rand < p, value, id)``."""
        prob = self.prob if prob is None else prob
        keep = self.rand(*(gate_shape or value.shape)) < prob
        return np.where(keep, value, self.ft(identity)).astype(self.ft)

    def fixed(self, value: torch.Tensor | float, shape) -> np.ndarray:
        """The deterministic mode's value (a float32 scalar) for every sample."""
        return np.full(shape, float(value), dtype=self.ft)

    def erfinv_pct(self) -> torch.Tensor:
        """erfinv(2 pct - 1), a float32 scalar tensor."""
        return torch.erfinv(self.pct * 2 - 1)

    def rotation_prob(self):
        """Each of the two rotations fires with 1 - sqrt(1 - p): P(either) = p."""
        return self.ft(1) - np.sqrt(np.clip(self.ft(1) - self.prob, self.ft(0), self.ft(1)))

    # 3x3 homogeneous matrices, batched over the samples, at the sampler's precision
    def matrix(self, rows) -> np.ndarray:
        out = np.empty((self.n, 3, 3), dtype=self.ft)
        for r, row in enumerate(rows):
            for c, v in enumerate(row):
                out[:, r, c] = v
        return out

    def translate(self, tx, ty) -> np.ndarray:
        return self.matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]])

    def scale(self, sx, sy) -> np.ndarray:
        return self.matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]])

    def rotate(self, theta: np.ndarray) -> np.ndarray:
        return self.matrix([[np.cos(theta), np.sin(-theta), 0], [np.sin(theta), np.cos(theta), 0],
                            [0, 0, 1]])


# Each geometric step draws its per-sample values and returns its factor of the inverse matrix
# (output pixel -> input pixel), multiplied on the right in the order of GEOMETRY_STEPS.

def _xflip(d: _Draws) -> np.ndarray:
    i = d.gated(np.floor(d.rand(d.n) * d.ft(2)), 0.0)
    if d.pct is not None:
        i = d.fixed(torch.floor(d.pct * 2), d.n)
    return d.scale(d.ft(1) / (d.ft(1) - d.ft(2) * i), 1.0)


def _rotate90(d: _Draws) -> np.ndarray:
    i = d.gated(np.floor(d.rand(d.n) * d.ft(4)), 0.0)
    if d.pct is not None:
        i = d.fixed(torch.floor(d.pct * 4), d.n)
    return d.rotate(-(d.ft(-math.pi / 2) * i))  # the inverse rotates back


def _integer_translation(d: _Draws) -> np.ndarray:
    t = (d.rand(d.n, 2) * d.ft(2) - d.ft(1)) * d.ft(XINT_MAX)
    t = d.gated(t, 0.0, gate_shape=(d.n, 1))
    if d.pct is not None:
        t = d.fixed((d.pct * 2 - 1) * XINT_MAX, (d.n, 2))
    return d.translate(-np.round(t[:, 0] * d.ft(d.w)), -np.round(t[:, 1] * d.ft(d.h)))


def _log2_normal_scale(d: _Draws, std: float) -> np.ndarray:
    """2^(std N) per sample (ADA's isotropic and anisotropic scales); torch's exp2, as the
    pipeline's (numpy's can differ by an ulp)."""
    s = d.gated(torch.exp2(torch.from_numpy(d.randn(d.n) * d.ft(std))).numpy(), 1.0)
    if d.pct is not None:
        s = d.fixed(torch.exp2(d.erfinv_pct() * std), d.n)
    return s


def _isotropic_scale(d: _Draws) -> np.ndarray:
    s = _log2_normal_scale(d, SCALE_STD)
    return d.scale(d.ft(1) / s, d.ft(1) / s)


def _rotation_angle(d: _Draws, fixed_angle) -> np.ndarray:
    theta = (d.rand(d.n) * d.ft(2) - d.ft(1)) * d.ft(math.pi) * d.ft(ROTATE_MAX)
    theta = d.gated(theta, 0.0, prob=d.rotation_prob())
    if d.pct is not None:
        theta = d.fixed(fixed_angle, d.n)
    return theta


def _pre_rotation(d: _Draws) -> np.ndarray:
    """Rotation before the anisotropic scale."""
    fixed = None if d.pct is None else (d.pct * 2 - 1) * math.pi * ROTATE_MAX
    return d.rotate(_rotation_angle(d, fixed))


def _anisotropic_scale(d: _Draws) -> np.ndarray:
    s = _log2_normal_scale(d, ANISO_STD)
    return d.scale(d.ft(1) / s, d.ft(1) / (d.ft(1) / s))


def _post_rotation(d: _Draws) -> np.ndarray:
    """Rotation after the anisotropic scale (none in the official deterministic mode)."""
    return d.rotate(_rotation_angle(d, 0.0))


def _fractional_translation(d: _Draws) -> np.ndarray:
    t = d.gated(d.randn(d.n, 2) * d.ft(XFRAC_STD), 0.0, gate_shape=(d.n, 1))
    if d.pct is not None:
        t = d.fixed(d.erfinv_pct() * XFRAC_STD, (d.n, 2))
    return d.translate(-(t[:, 0] * d.ft(d.w)), -(t[:, 1] * d.ft(d.h)))


# (preset letter, step) in the pipeline's draw order.
GEOMETRY_STEPS = (
    ("b", _xflip), ("b", _rotate90), ("b", _integer_translation),
    ("g", _isotropic_scale), ("g", _pre_rotation), ("g", _anisotropic_scale),
    ("g", _post_rotation), ("g", _fractional_translation),
)

# Colour fields in the pipeline's draw order, each a function of one uniform draw u per sample.
COLOUR_DRAWS = (
    ("brightness", lambda u: u - 0.5),  # offset
    ("contrast", lambda u: u + 0.5),    # factor about the mean over (C, H, W)
    ("saturation", lambda u: u * 2),    # factor about the mean over C
)


def _draw_inverse_matrices(d: _Draws, preset: str) -> np.ndarray | None:
    """(N, 3, 3) product of the enabled geometric steps' factors, or None without geometry."""
    g_inv = None
    for letter, step in GEOMETRY_STEPS:
        if letter in preset:
            factor = step(d)
            g_inv = factor if g_inv is None else g_inv @ factor
    return g_inv


def _draw_colour(d: _Draws, num_channels: int, debug_percentile) -> dict[str, torch.Tensor]:
    fields = {}
    for name, from_uniform in COLOUR_DRAWS:
        if name == "saturation" and num_channels == 1:
            fields[name] = torch.ones(d.n, dtype=d.dtype)  # a no-op: the pipeline draws nothing
            continue
        u = torch.rand(d.n, generator=d.generator, dtype=d.dtype)
        if debug_percentile is not None:
            # the official colour draws ignore debug_percentile; ours equal it
            u = torch.full_like(u, float(debug_percentile))
        fields[name] = from_uniform(u)
    return fields


def _draw_cutout(d: _Draws) -> tuple[torch.Tensor, torch.Tensor]:
    """(centre, size), each (N, 2): a rectangle of CUTOUT_SIZE, or size 0 where the gate fails."""
    size = torch.full((d.n, 2), CUTOUT_SIZE, dtype=d.dtype)
    gate = torch.rand(d.n, 1, generator=d.generator, dtype=d.dtype) < float(d.prob)
    size = torch.where(gate, size, torch.zeros_like(size))
    center = torch.rand(d.n, 2, generator=d.generator, dtype=d.dtype)
    if d.pct is not None:
        size = torch.full_like(size, CUTOUT_SIZE)
        center = torch.full_like(center, float(d.pct))  # float32, as the pipeline's
    return center, size


def _check_sample_args(batch_size, height, width, generator, debug_percentile, preset, dtype):
    for name, v in (("batch_size", batch_size), ("height", height), ("width", width)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
    if debug_percentile is not None and not (0.0 <= float(debug_percentile) < 1.0):
        raise ValueError(f"debug_percentile must be in [0, 1), got {debug_percentile!r}")
    if debug_percentile is not None and float(debug_percentile) == 0.0 and "g" in preset:
        # erfinv(-1) = -inf: a zero scale (the official pipeline returns NaN there)
        raise ValueError("debug_percentile must be in (0, 1) for presets with 'g', got 0")
    if dtype not in _NUMPY_DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")


def sampling_dtype(latent_dtype: torch.dtype) -> torch.dtype:
    """The precision :meth:`AugmentParams.sample` should draw at for latents of ``latent_dtype``:
    float64 for float64 latents (as the official pipeline run in float64), else float32."""
    return torch.float64 if latent_dtype == torch.float64 else torch.float32


@dataclass
class AugmentParams:
    """Parameters of one paired augmentation of a batch of ``batch_size`` latents of size
    ``height`` x ``width``.  Host-drawn: the fields below live on the CPU (tiny) and
    :meth:`packed` ships what the kernels need to the latents' device in one copy.
    Device-drawn (:meth:`sample_on_device`): only ``packed_params`` and ``preset`` are set;
    :meth:`to_host` rebuilds the other fields (one device-to-host copy)."""

    batch_size: int
    height: int
    width: int
    # host fields: CPU tensors at the sampler's precision (float32 or float64)
    g_inv: torch.Tensor | None = None            # (N, 3, 3): output pixel -> input pixel
    margins: tuple[int, int, int, int] = (0, 0, 0, 0)  # reflect padding (x0, y0, x1, y1)
    brightness: torch.Tensor | None = None       # (N,) offset added (u - 0.5)
    contrast: torch.Tensor | None = None         # (N,) factor (u + 0.5)
    saturation: torch.Tensor | None = None       # (N,) factor 2u
    cutout_center: torch.Tensor | None = None    # (N, 2) centre (x, y), relative to the size
    cutout_size: torch.Tensor | None = None      # (N, 2) size (x, y), relative (0 = no cutout)
    # (N, 17) float64 packed parameters, authoritative when set (device-drawn parameters, or
    # the host copy that to_host / from_packed keep so the reference uses the exact values).
    packed_params: torch.Tensor | None = None
    preset: str | None = None  # the preset of device-drawn parameters (their flags, host-side)

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def identity(cls, batch_size: int, height: int, width: int) -> "AugmentParams":
        """No augmentation at all: the op returns its inputs unchanged."""
        return cls(int(batch_size), int(height), int(width))

    @classmethod
    def sample(cls, preset: str, batch_size: int, height: int, width: int, *,
               num_channels: int = 4, generator: torch.Generator | None = None,
               debug_percentile: float | None = None, p: float = 1.0,
               dtype: torch.dtype = torch.float32) -> "AugmentParams":
        """Draw one transform per sample for ``preset`` (letters of ``"bgco"``).

        Args:
            preset: letters of ``"bgco"`` (any order).
            batch_size, height, width: the latents' N, H, W.
            num_channels: the latents' C (with one channel no saturation is drawn).
            generator: a CPU ``torch.Generator`` (None = torch's default CPU generator).
            debug_percentile: in [0, 1): every draw deterministic (see the module doc).
            p: the ADA probability multiplier (1 = every enabled transform fires).
            dtype: precision of the draws and of the per-sample arithmetic, ``torch.float32``
                (the official pipeline on float32 latents) or ``torch.float64`` (the official
                pipeline run in float64); :func:`sampling_dtype` picks it from the latents.

        Returns:
            AugmentParams whose fields are CPU tensors of ``dtype``: g_inv (N, 3, 3), colour
            (N,) and cutout (N, 2) fields, each set when its letter is in the preset."""
        preset = parse_preset(preset)
        _check_sample_args(batch_size, height, width, generator, debug_percentile, preset, dtype)
        d = _Draws(batch_size, height, width, generator, dtype, p, debug_percentile)
        out = cls(batch_size, height, width)
        g_inv = _draw_inverse_matrices(d, preset)
        if g_inv is not None:
            out.g_inv = torch.from_numpy(np.ascontiguousarray(g_inv, dtype=d.ft))
            out.margins = compute_margins(out.g_inv, height, width, dtype=d.ft)
        if "c" in preset:
            for name, value in _draw_colour(d, num_channels, debug_percentile).items():
                setattr(out, name, value)
        if "o" in preset:
            out.cutout_center, out.cutout_size = _draw_cutout(d)
        return out

    @classmethod
    def sample_on_device(cls, preset: str, batch_size: int, height: int, width: int, *,
                         num_channels: int = 4, p: float = 1.0,
                         device: torch.device | str = "cuda",
                         generator: torch.Generator | None = None,
                         seed: int | None = None) -> "AugmentParams":
        """Draw one transform per sample on ``device`` with the compiled sampler op: the same
        distributions as :meth:`sample` (not the same numbers), one kernel launch, no host
        synchronisation, so it can be captured in a CUDA graph (each replay draws anew).

        ``generator``: a ``torch.Generator`` on ``device``'s type (None = that device's default
        generator; ``torch.manual_seed`` reproduces the draws).  ``seed`` (>= 0) replaces the
        generator: the same seed gives bitwise the same random integers on the CPU and the GPU.
        ``debug_percentile`` is host-only (:meth:`sample`)."""
        from d2g_fast import _ext  # noqa: PLC0415 (the extension is optional)
        preset = parse_preset(preset)
        for name, v in (("batch_size", batch_size), ("height", height), ("width", width),
                        ("num_channels", num_channels)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not (0.0 <= float(p) <= 1.0):
            raise ValueError(f"p must be in [0, 1], got {p!r}")
        device = torch.device(device)
        if generator is not None and generator.device.type != device.type:
            raise ValueError(f"generator must be a torch.Generator on a {device.type} device "
                             f"(the draws run on {device}), got one on {generator.device}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
        if not device_sampler_available(device.type):
            raise RuntimeError(f"AugmentParams.sample_on_device needs the compiled extension with "
                               f"the '{SAMPLER_OP}' op for {device.type} (rebuild it: "
                               f"make build)"
                               + ("" if _ext.ext_loaded() else "; the extension is not loaded"))
        packed = torch.empty((batch_size, PACKED_COLUMNS), dtype=torch.float64, device=device)
        bits = sum(PRESET_BITS[ch] for ch in preset)
        getattr(torch.ops.d2g_fast, SAMPLER_OP)(packed, num_channels, height, width, bits,
                                                float(p), generator, seed)
        return cls(batch_size, height, width, packed_params=packed, preset=preset)

    @classmethod
    def from_packed(cls, packed: torch.Tensor, preset: str, height: int, width: int
                    ) -> "AugmentParams":
        """Host parameters rebuilt from a packed (N, 17) tensor drawn for ``preset`` (copies it
        to the CPU): g_inv (float32), margins, colour (float64) and cutout (float32) fields.
        The object keeps the float64 packed copy, which stays authoritative for :meth:`packed`
        and the reference."""
        preset = parse_preset(preset)
        if not (isinstance(packed, torch.Tensor) and packed.dim() == 2
                and packed.shape[1] == PACKED_COLUMNS):
            raise ValueError(f"packed must be a (N, {PACKED_COLUMNS}) tensor, got "
                             f"{tuple(packed.shape) if isinstance(packed, torch.Tensor) else type(packed)}")
        host = packed.detach().to("cpu", torch.float64).contiguous()
        a = host.numpy()
        n = a.shape[0]
        out = cls(n, int(height), int(width), packed_params=host, preset=preset)
        if "b" in preset or "g" in preset:
            out.margins = tuple(int(v) for v in a[0, MARGIN_COLUMNS])
            out.g_inv = torch.from_numpy(g_inv_from_packed(a, height, width).astype(np.float32))
        if "c" in preset:  # float64: the values the kernels use (the cutout's are float32 there)
            out.brightness = torch.from_numpy(a[:, 6].copy())
            out.contrast = torch.from_numpy(a[:, 7].copy())
            out.saturation = torch.from_numpy(a[:, 8].copy())
        if "o" in preset:
            out.cutout_center = torch.from_numpy(a[:, 9:11].astype(np.float32))
            out.cutout_size = torch.from_numpy((2 * a[:, 11:13]).astype(np.float32))
        return out

    @property
    def device_drawn(self) -> bool:
        """True while only the packed tensor is set (drawn by :meth:`sample_on_device`)."""
        return (self.packed_params is not None and self.g_inv is None and self.brightness is None
                and self.cutout_center is None)

    def to_host(self) -> "AugmentParams":
        """These parameters with every host field filled: device-drawn ones are rebuilt from a
        CPU copy of the packed tensor (a synchronisation); others are returned as they are."""
        if not self.device_drawn:
            return self
        return AugmentParams.from_packed(self.packed_params, self.preset, self.height, self.width)

    # ---- properties ----------------------------------------------------------------------------
    @property
    def has_geometry(self) -> bool:
        if self.preset is not None:
            return "b" in self.preset or "g" in self.preset
        return self.g_inv is not None

    @property
    def has_colour(self) -> bool:
        if self.preset is not None:
            return "c" in self.preset
        return self.brightness is not None

    @property
    def has_cutout(self) -> bool:
        if self.preset is not None:
            return "o" in self.preset
        return self.cutout_center is not None

    @property
    def is_identity(self) -> bool:
        return not (self.has_geometry or self.has_colour or self.has_cutout)

    def check(self, x: torch.Tensor, arg: str = "x") -> None:
        """Raise if these parameters were drawn for another batch or image size than ``x``."""
        n, _, h, w = x.shape
        if n != self.batch_size:
            raise ValueError(f"params: drawn for batch size {self.batch_size}, but {arg} has "
                             f"batch size {n}")
        if (h, w) != (self.height, self.width):
            raise ValueError(f"params: drawn for {self.height}x{self.width} latents, but {arg} is "
                             f"{h}x{w}")

    def sampling_affine(self) -> torch.Tensor:
        """(N, 6) float64 [a00, a01, a02, a10, a11, a12]: the coordinate (x, y) in the 2x
        upsampled padded input that the resampling grid point (jx, jy) reads, as
        ``x = a00*jx + a01*jy + a02``.  The resampling grid has 2(W+6) x 2(H+6) points; point j
        sits at the input's centred coordinate (j+1)/2 - (W+6)/2."""
        return torch.from_numpy(self._affine_numpy())

    def _affine_numpy(self) -> np.ndarray:
        n, h, w = self.batch_size, self.height, self.width
        if self.packed_params is not None:
            return self.packed_params.detach().to("cpu", torch.float64).numpy()[:, 0:6].copy()
        if self.g_inv is None:
            return np.zeros((n, 6))
        g = self.g_inv.numpy().astype(np.float64)
        mx0, my0, _, _ = self.margins
        cx, cy = (w - 1) / 2, (h - 1) / 2
        ox, oy = 0.5 - (w + 2 * FILTER_PAD) / 2, 0.5 - (h + 2 * FILTER_PAD) / 2  # w at j = 0
        a = np.empty((n, 6))
        for row, (c0, m0) in enumerate(((cx, mx0), (cy, my0))):
            # padded-input coordinate z + c + m, then 2x for the upsampled grid
            a[:, 3 * row + 0] = g[:, row, 0]
            a[:, 3 * row + 1] = g[:, row, 1]
            a[:, 3 * row + 2] = 2 * (g[:, row, 0] * ox + g[:, row, 1] * oy + g[:, row, 2] + c0 + m0)
        return a

    def packed(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64
               ) -> torch.Tensor:
        """(N, 17) tensor for the kernels: sampling affine (6), brightness offset, contrast
        factor, saturation factor, cutout centre x, y, cutout half-size x, y, reflect-padding
        margins x0, y0, x1, y1 (the same in every row).  Device-drawn parameters return their
        tensor as it is (moved only if asked for another device)."""
        if self.packed_params is not None:
            # a no-op on the same device; a blocking copy otherwise (a non-blocking copy to the
            # CPU could be read before it lands)
            return self.packed_params.to(device=device, dtype=dtype)
        n = self.batch_size
        p = np.zeros((n, PACKED_COLUMNS))
        p[:, 0:6] = self._affine_numpy()
        p[:, 7:9] = 1.0
        if self.brightness is not None:
            p[:, 6] = self.brightness.numpy()
            p[:, 7] = self.contrast.numpy()
            p[:, 8] = self.saturation.numpy()
        if self.cutout_center is not None:
            p[:, 9:11] = self.cutout_center.numpy()
            p[:, 11:13] = self.cutout_size.numpy() / 2
        if self.g_inv is not None:
            p[:, MARGIN_COLUMNS] = self.margins
        t = torch.from_numpy(p)
        if device != "cpu" and torch.device(device).type == "cuda":
            t = t.pin_memory()  # a real asynchronous copy: no host synchronisation
        return t.to(device=device, dtype=dtype, non_blocking=True)

    def flags(self) -> int:
        """Bit mask for the kernels: 1 = geometry, 2 = colour, 4 = cutout."""
        return int(self.has_geometry) | 2 * int(self.has_colour) | 4 * int(self.has_cutout)


# The device-side sampler op (AugmentParams.sample_on_device).
SAMPLER_OP = "augment_params_sample_on_device_"


@torch.compiler.assume_constant_result  # torch.compile: a constant, not a traced call
def device_sampler_available(device_type: str | None = None) -> bool:
    """Whether the compiled extension has the device-side sampler op (with a kernel for
    ``device_type``, "cpu" or "cuda", when given)."""
    from d2g_fast import _ext  # noqa: PLC0415
    if not (_ext.ext_loaded() and hasattr(torch.ops.d2g_fast, SAMPLER_OP)):
        return False
    # The extension registers the op's CPU kernel always and its CUDA kernel whenever it is
    # built with CUDA kernels, so the build record answers without asking the dispatcher.
    kernels = {None: True, "cpu": True, "cuda": _ext.cuda_kernels_compiled()}
    return kernels.get(device_type, False)


def g_inv_from_packed(packed: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, 3, 3) float64 inverse matrices recovered from packed rows (the inverse of how
    :meth:`AugmentParams.packed` builds the sampling affine from g_inv and the margins)."""
    a = np.asarray(packed, dtype=np.float64)
    n = a.shape[0]
    ox, oy = 0.5 - (width + 2 * FILTER_PAD) / 2, 0.5 - (height + 2 * FILTER_PAD) / 2
    centre = ((width - 1) / 2, (height - 1) / 2)
    g = np.zeros((n, 3, 3))
    g[:, 2, 2] = 1.0
    for row in range(2):
        g[:, row, 0] = a[:, 3 * row]
        g[:, row, 1] = a[:, 3 * row + 1]
        g[:, row, 2] = (a[:, 3 * row + 2] / 2 - a[:, 13 + row] - centre[row]
                        - a[:, 3 * row] * ox - a[:, 3 * row + 1] * oy)
    return g


def compute_margins(g_inv: torch.Tensor, height: int, width: int, dtype=np.float32
                    ) -> tuple[int, int, int, int]:
    """Reflect-padding margins (x0, y0, x1, y1) that cover where the output corners land in the
    input plus the filter support, taken over the whole batch, clamped to size - 1 (the most
    a reflection can pad).  ``dtype`` arithmetic (numpy float32 or float64), the pipeline's at
    the same precision, so the ceil agrees even where a corner lands a rounding error away from
    an integer."""
    f32 = dtype
    cx, cy = (width - 1) / 2, (height - 1) / 2
    corners = np.array([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]], dtype=f32)
    where = np.asarray(g_inv, dtype=f32) @ corners.T                # (N, 3, 4)
    xs, ys = where[:, 0, :], where[:, 1, :]
    m = np.array([(-xs).max(), (-ys).max(), xs.max(), ys.max()], dtype=f32)
    pad = 2 * FILTER_PAD
    m = m + np.array([pad - cx, pad - cy] * 2, dtype=f32)
    m = np.minimum(np.maximum(m, f32(0)), np.array([width - 1, height - 1] * 2, dtype=f32))
    mx0, my0, mx1, my1 = (int(v) for v in np.ceil(m))
    return mx0, my0, mx1, my1
