"""Generation for evaluation: per-index determinism, no safety checker, uint8, crop + resize."""
import numpy as np
import pytest
import torch
from d2g_helpers import one_thread
from PIL import Image

from d2g_fast.eval import generate as gen
from d2g_fast.eval.protocol import resolve_protocol
from d2g_fast.testing.tiny import save_tiny_sd_pipeline, save_tiny_sdxl_pipeline


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    with one_thread():
        path = save_tiny_sd_pipeline(str(tmp_path_factory.mktemp("gen") / "pipe"))
        return gen.load_pipeline(path, torch.device("cpu"), torch.float32)


def test_image_depends_on_its_index_only(pipe):
    assert pipe.safety_checker is None
    captions = [f"caption {i}" for i in range(6)]
    with one_thread():
        batch = gen.generate_images(pipe, captions, [1, 2, 3, 4], seed=0, steps=2, guidance=7.5,
                                    size=16)
        alone = gen.generate_images(pipe, captions, [3], seed=0, steps=2, guidance=7.5, size=16)
        other_seed = gen.generate_images(pipe, captions, [3], seed=1, steps=2, guidance=7.5,
                                         size=16)
    assert batch.dtype == np.uint8 and batch.shape == (4, 16, 16, 3)
    # Same latents and caption; a different batch may change float rounding by one level.
    assert np.abs(batch[2].astype(int) - alone[0].astype(int)).max() <= 1
    assert np.abs(other_seed[0].astype(int) - alone[0].astype(int)).max() > 1
    lat = gen.image_latents(pipe, 0, [3, 5], 16)
    assert lat.shape == (2, 4, 8, 8)
    torch.testing.assert_close(lat[0], gen.image_latents(pipe, 0, [3], 16)[0], rtol=0, atol=0)


def test_quantise_rounds_like_diffusers():
    from diffusers.image_processor import VaeImageProcessor

    x = np.linspace(0, 1, 3 * 4 * 1021).reshape(1, 4, 1021, 3)  # every level, and the halves
    x = np.concatenate([x, np.full_like(x, 0.5 / 255), np.full_like(x, 1.5 / 255)])
    expected = np.stack([np.asarray(im) for im in VaeImageProcessor.numpy_to_pil(x)])
    np.testing.assert_array_equal(gen.quantise(x), expected)
    np.testing.assert_array_equal(gen.quantise(np.array([-0.2, 1.3])), [0, 255])


def test_center_crop_then_resize_with_the_protocol_filter():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)  # wide: crop columns 10..39
    got = gen.center_crop_resize(image, 12, "lanczos")
    expected = np.asarray(Image.fromarray(image[:, 10:40]).resize(
        (12, 12), resample=Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(got, expected)
    bicubic = gen.center_crop_resize(image, 12, "bicubic")
    assert not np.array_equal(bicubic, got)
    tall = rng.integers(0, 256, (41, 20, 3), dtype=np.uint8)  # tall: rows 10..29
    np.testing.assert_array_equal(gen.center_crop_resize(tall, 20, "lanczos"), tall[10:30])
    protocol = resolve_protocol("coco30k-gigagan", resolution=12)
    assert gen.prepare_images(image[None], protocol).shape == (1, 12, 12, 3)


def test_sdxl_pipeline_folder(tmp_path):
    with one_thread():
        path = save_tiny_sdxl_pipeline(str(tmp_path / "sdxl"))
        pipe = gen.load_pipeline(path, torch.device("cpu"), torch.float32)
        size = gen.native_resolution(pipe)
        images = gen.generate_images(pipe, ["a cat", "a dog"], [0, 1], seed=0, steps=1,
                                     guidance=0.0, size=size)
    assert images.shape == (2, size, size, 3) and images.dtype == np.uint8


def test_not_a_pipeline_folder_names_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="--model"):
        gen.load_pipeline(str(tmp_path), torch.device("cpu"), torch.float32)
