"""The pinned protocol: named choices, overrides, captions and per-index seeds."""
import json

import pytest

from d2g_fast.eval.protocol import (PROTOCOLS, captions_sha256, image_seed, load_captions,
                                    resolve_protocol)
from d2g_fast.eval.report import protocol_mismatches


def test_named_protocol_keeps_its_name_only_when_unchanged():
    p = resolve_protocol("coco30k-gigagan")
    assert (p.name, p.num_images, p.resolution, p.resize_filter, p.crop, p.clip_prefix) == \
        ("coco30k-gigagan", 30000, 256, "lanczos", "center", "A photo depicts ")
    assert resolve_protocol("coco30k-gigagan", num_images=30000, seed=None).name == \
        "coco30k-gigagan"
    assert resolve_protocol("coco30k-gigagan", num_images=5000).name == "custom"
    custom = resolve_protocol("coco30k-gigagan", resolution=512)
    assert protocol_mismatches({"protocol": custom.to_dict()}, {"protocol": p.to_dict()}) == \
        ["name: 'custom' vs 'coco30k-gigagan'", "resolution: 512 vs 256"]


def test_bad_protocol_choices_name_the_argument():
    with pytest.raises(ValueError, match="--protocol.*coco30k-gigagan"):
        resolve_protocol("fid-everything")
    with pytest.raises(ValueError, match="--num-images"):
        resolve_protocol("coco30k-gigagan", num_images=1)
    with pytest.raises(ValueError, match="--resolution"):
        resolve_protocol("coco30k-gigagan", resolution=0)
    assert set(PROTOCOLS["coco30k-gigagan"]) == {"num_images", "resolution", "crop",
                                                 "resize_filter", "seed", "clip_prefix"}


def test_captions_files_and_their_hash(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("a cat\n\n  two   dogs \nthe sea\n", encoding="utf-8")
    assert load_captions(str(txt), 2) == ["a cat", "two dogs"]
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"annotations": [{"caption": "a cat"}, {"caption": "two dogs"}]}))
    assert load_captions(str(js), 2) == ["a cat", "two dogs"]
    assert captions_sha256(["a cat", "two dogs"]) != captions_sha256(["two dogs", "a cat"])
    with pytest.raises(ValueError, match="--captions.*3 captions.*--num-images 4"):
        load_captions(str(txt), 4)
    with pytest.raises(FileNotFoundError, match="--captions"):
        load_captions(str(tmp_path / "none.txt"), 1)
    empty = tmp_path / "e.txt"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="--captions"):
        load_captions(str(empty), 1)


def test_image_seeds_depend_on_seed_and_index_only():
    seeds = {image_seed(0, i) for i in range(1000)} | {image_seed(1, i) for i in range(1000)}
    assert len(seeds) == 2000 and image_seed(0, 5) == image_seed(0, 5)
