"""The toy world's data: coloured shapes on a plain background, drawn by the package itself.

Each 32x32 RGB image shows one shape with four attributes, and its caption names all four::

    "a red circle in the top left on a black background"

    shape       circle | horizontal bar | vertical bar
    colour      red | green | blue
    position    top left | top right | bottom left | bottom right
    background  black | white

so prompt adherence is measurable per attribute. Within a caption the picture still varies
(shape size, a small offset, colour brightness, background shade), so the set of real images for
one caption is a distribution, not a single picture: the Fréchet distance has something to
measure. Everything is drawn from a ``torch.Generator``: the same seed gives the same images.

Images are float tensors in [-1, 1] (the diffusers VAE convention), shape (N, 3, 32, 32).
Labels are int64 tensors (N, 4): the index of each attribute in ``ATTRIBUTES`` order.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

RESOLUTION = 32
# Shapes whose silhouettes differ even when blurred (aspect ratio): a 4x8x8 latent keeps them
# apart, where a circle and a square would decode to the same soft blob.
SHAPES = ("circle", "horizontal bar", "vertical bar")
COLOURS = {"red": (0.90, 0.12, 0.10), "green": (0.12, 0.78, 0.20), "blue": (0.15, 0.30, 0.95)}
POSITIONS = {"top left": (0.28, 0.28), "top right": (0.72, 0.28),
             "bottom left": (0.28, 0.72), "bottom right": (0.72, 0.72)}  # (x, y) / RESOLUTION
BACKGROUNDS = {"black": 0.06, "white": 0.94}
# Attribute name -> its values, in label-column order.
ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS), "position": tuple(POSITIONS),
              "background": tuple(BACKGROUNDS)}
NUM_CLASSES = tuple(len(v) for v in ATTRIBUTES.values())
# Caption template; the empty caption "" is the unconditional prompt of classifier-free guidance.
CAPTION = "a {colour} {shape} in the {position} on a {background} background"

# Variation within a caption (fractions of the image side, or of the colour value).
_RADIUS = (0.17, 0.22)
_OFFSET = 0.04
_BRIGHTNESS = (0.8, 1.0)
_BACKGROUND_SHADE = 0.05
# Shapes are drawn on a finer grid and averaged down: smooth (anti-aliased) edges.
_SUPERSAMPLE = 4


def caption(labels) -> str:
    """The caption of one label row (4 attribute indices)."""
    values = {name: ATTRIBUTES[name][int(i)] for name, i in zip(ATTRIBUTES, labels)}
    return CAPTION.format(**values)


def captions(labels: torch.Tensor) -> list[str]:
    """Captions of a (N, 4) label tensor."""
    return [caption(row) for row in labels.tolist()]


def all_labels() -> torch.Tensor:
    """Every attribute combination once, (72, 4), in a fixed order (shape slowest)."""
    grids = torch.meshgrid(*[torch.arange(n) for n in NUM_CLASSES], indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=1)


def all_captions() -> list[str]:
    """The 72 captions of the world: the training prompts (and the held-out prompts' space)."""
    return captions(all_labels())


@functools.lru_cache(maxsize=1)
def _caption_table() -> dict[str, tuple[int, ...]]:
    return {caption(row): tuple(row.tolist()) for row in all_labels()}


def parse_caption(text: str) -> torch.Tensor:
    """The label row (4,) of a caption; ValueError if ``text`` is not a caption of this world."""
    table = _caption_table()
    if text not in table:
        example = caption((0, 0, 0, 0))
        raise ValueError(f"prompt {text!r} is not a caption of the toy world "
                         f"(expected e.g. {example!r})")
    return torch.tensor(table[text])


def random_labels(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 4) attribute indices drawn uniformly and independently."""
    return torch.stack([torch.randint(k, (n,), generator=generator) for k in NUM_CLASSES], dim=1)


def _shape_masks(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Anti-aliased coverage (N, 1, R, R) in [0, 1] of each label's shape, with random size and
    offset."""
    n = labels.shape[0]
    size = RESOLUTION * _SUPERSAMPLE
    centres = torch.tensor(list(POSITIONS.values()))[labels[:, 2]]
    centres = centres + (torch.rand(n, 2, generator=generator) * 2 - 1) * _OFFSET
    radius = _RADIUS[0] + torch.rand(n, generator=generator) * (_RADIUS[1] - _RADIUS[0])
    coords = (torch.arange(size) + 0.5) / size
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    dx = (x[None] - centres[:, 0, None, None]) / radius[:, None, None]
    dy = (y[None] - centres[:, 1, None, None]) / radius[:, None, None]
    circle = dx.square() + dy.square() <= 1.0
    horizontal = (dx.abs() <= 1.25) & (dy.abs() <= 0.5)  # about the circle's area
    vertical = (dx.abs() <= 0.5) & (dy.abs() <= 1.25)
    masks = torch.stack([circle, horizontal, vertical], dim=1)  # (N, 3, S, S), SHAPES order
    mask = masks[torch.arange(n), labels[:, 0]].float()[:, None]
    return F.avg_pool2d(mask, _SUPERSAMPLE)


def draw(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Images (N, 3, 32, 32) in [-1, 1] of the given (N, 4) labels; the within-caption variation
    is drawn from ``generator``."""
    if labels.ndim != 2 or labels.shape[1] != len(ATTRIBUTES):
        raise ValueError(f"labels must have shape (N, {len(ATTRIBUTES)}), "
                         f"got {tuple(labels.shape)}")
    labels = labels.long()
    n = labels.shape[0]
    mask = _shape_masks(labels, generator)
    colour = torch.tensor(list(COLOURS.values()))[labels[:, 1]]
    colour = colour * (_BRIGHTNESS[0] + torch.rand(n, 1, generator=generator)
                       * (_BRIGHTNESS[1] - _BRIGHTNESS[0]))
    shade = torch.tensor(list(BACKGROUNDS.values()))[labels[:, 3]]
    shade = shade + (torch.rand(n, generator=generator) * 2 - 1) * _BACKGROUND_SHADE
    background = shade[:, None].expand(n, 3)
    image = mask * colour[:, :, None, None] + (1 - mask) * background[:, :, None, None]
    return image.clamp(0, 1) * 2 - 1


def sample(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``n`` random real images of the world, deterministic by ``seed``.

    Returns:
        images (n, 3, 32, 32) in [-1, 1], labels (n, 4) int64, captions (list of n str).
    """
    generator = torch.Generator().manual_seed(seed)
    labels = random_labels(n, generator)
    return draw(labels, generator), labels, captions(labels)


def heldout_labels(n: int) -> torch.Tensor:
    """(n, 4) labels that cycle through all 72 combinations (balanced held-out prompts)."""
    labels = all_labels()
    return labels[torch.arange(n) % labels.shape[0]]
