"""The pinned evaluation protocol: every choice that moves FID or CLIP score, recorded in each
report so that two numbers are compared only when they were measured the same way.

A named protocol fixes the defaults; ``Protocol`` records the resolved choices, including the
sha256 of the caption list actually used and of every weights file, filled in at run time.
"""
from __future__ import annotations

import dataclasses
import os

from d2g_fast.data.seeding import derive_seed
from d2g_fast.data.store import canonical_json, sha256_bytes

SEED_STREAM = "eval"
SEED_RULE = ("image i: caption i of the list; initial latents randn float32 [C, H/f, W/f] from a "
             f"CPU torch.Generator seeded with derive_seed(seed, i, '{SEED_STREAM}')")
QUANTISATION = "pipeline output in [0, 1] -> round(x * 255) as uint8, before any resize or feature"
SAFETY_CHECKER = "none (disabled at load)"
CLIP_RULE = "mean over images of cos(CLIP image embedding, CLIP text embedding of prefix + caption)"
RESIZE_FILTERS = ("lanczos", "bicubic", "bilinear", "box")
# Sample-distribution measures in the Inception space (d2g_fast.eval.manifold, .diversity).
PR_K = 3  # Kynkäänniemi et al. 2019's default neighbourhood size
PR_RULE = ("improved precision / recall (Kynkäänniemi et al. 2019): k-NN balls (k = pr_k, the "
           "point itself not counted) around each reference and each generated Inception "
           "feature; precision = generated points inside some reference ball, recall = reference "
           "points inside some generated ball (distance <= radius); all generated images against "
           "all reference features; float64 distances")
DIVERSITY_PROMPTS = 200  # the first 200 captions (fewer when --num-images is smaller)
DIVERSITY_SEEDS = 4
DIVERSITY_STREAM = "eval-diversity"
DIVERSITY_RULE = (
    "diversity_seeds extra images of each of the first diversity_prompts captions: sample s of "
    "caption p is image j = p * diversity_seeds + s of a second set whose latents are drawn as "
    f"in seed_rule with base seed derive_seed(seed, 0, '{DIVERSITY_STREAM}'); diversity = mean "
    "over captions of the mean Euclidean distance between the Inception features of the "
    "caption's samples (all unordered pairs)")
# Fields that only the final metrics depend on (not the main shards' contents): left out of the
# main shards' configuration, so changing them never invalidates generated images.
SAMPLE_METRIC_FIELDS = ("pr_k", "pr_rule", "reference_features_sha256", "diversity_prompts",
                        "diversity_seeds", "diversity_rule")

# Named protocols. coco30k-gigagan: GigaGAN's evaluation, reused by DMD2 (30k COCO2014-val
# captions, centre crop + LANCZOS to 256, clean-fid vs val2014, CLIP ViT-B/32 "A photo depicts ").
PROTOCOLS: dict[str, dict] = {
    "coco30k-gigagan": dict(num_images=30000, resolution=256, crop="center",
                            resize_filter="lanczos", seed=0, clip_prefix="A photo depicts "),
}
CUSTOM = "custom"


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Every evaluation choice (identities of files as sha256; paths are not part of it)."""
    name: str
    num_images: int
    resolution: int
    crop: str
    resize_filter: str
    seed: int
    clip_prefix: str
    captions_sha256: str = ""        # of the first num_images captions (canonical JSON list)
    seed_rule: str = SEED_RULE
    quantisation: str = QUANTISATION
    safety_checker: str = SAFETY_CHECKER
    fid_library: str = ""            # "clean-fid <version>"
    fid_resize: str = ""
    inception_sha256: str = ""
    reference_sha256: str = ""       # of the reference statistics (mu, sigma) in float64
    clip_rule: str = CLIP_RULE
    clip_sha256: str | None = None   # None: no CLIP score
    extra_features_sha256: str | None = None  # None: no second feature space
    pr_k: int = PR_K
    pr_rule: str = PR_RULE
    reference_features_sha256: str | None = None  # None: the reference has no features (no P/R)
    diversity_prompts: int = DIVERSITY_PROMPTS  # 0: no diversity measured
    diversity_seeds: int = DIVERSITY_SEEDS
    diversity_rule: str = DIVERSITY_RULE

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def shard_dict(self) -> dict:
        """The choices the generated images and their features depend on (no metric-only
        fields): what the main shards' configuration records."""
        return {k: v for k, v in self.to_dict().items() if k not in SAMPLE_METRIC_FIELDS}

    def diversity_seed(self) -> int:
        """The base seed of the diversity set (its image j uses image_seed(this, j))."""
        return derive_seed(self.seed, 0, DIVERSITY_STREAM)


def resolve_protocol(name: str, **overrides) -> Protocol:
    """The named protocol's choices with ``overrides`` (None values ignored). Changing any of the
    named protocol's choices turns the name into "custom", so a modified run never passes for
    the named one.

    Args:
        name: a key of PROTOCOLS.
        overrides: num_images, resolution, crop, resize_filter, seed, clip_prefix.
    """
    if name not in PROTOCOLS:
        raise ValueError(f"--protocol: unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}")
    choices = {**PROTOCOLS[name], **{k: v for k, v in overrides.items() if v is not None}}
    if choices != PROTOCOLS[name]:
        name = CUSTOM
    if int(choices["num_images"]) < 2:
        raise ValueError(f"--num-images: need at least 2 images, got {choices['num_images']}")
    if int(choices["resolution"]) < 1:
        raise ValueError(f"--resolution: must be positive, got {choices['resolution']}")
    if choices["resize_filter"] not in RESIZE_FILTERS:
        raise ValueError(f"resize filter: {choices['resize_filter']!r} is not one of "
                         f"{RESIZE_FILTERS}")
    if choices["crop"] != "center":
        raise ValueError(f"crop: only 'center' is implemented, got {choices['crop']!r}")
    return Protocol(name=name, **choices)


def captions_sha256(captions: list[str]) -> str:
    return sha256_bytes(canonical_json(list(captions)))


def image_seed(seed: int, index: int) -> int:
    """The generator seed of image ``index`` (independent of batch, shard and process layout)."""
    return derive_seed(seed, index, SEED_STREAM)


def load_captions(path: str, num_images: int) -> list[str]:
    """The first ``num_images`` captions of ``path`` (text: one per line; .json: a list or the
    COCO captions layout; .jsonl). Errors name --captions (and --num-images when too few)."""
    from d2g_fast.data.prompts import load_prompts

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--captions: no such file {path!r}")
    try:
        captions = load_prompts(path)
    except (FileNotFoundError, ValueError) as exc:
        raise ValueError(str(exc).replace("prompts (--prompts)", "--captions")) from exc
    if len(captions) < num_images:
        raise ValueError(f"--captions: {path!r} holds {len(captions)} captions, fewer than "
                         f"--num-images {num_images} (one caption per image)")
    return captions[:num_images]
