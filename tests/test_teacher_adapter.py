"""The teacher adapter reproduces the diffusers pipelines (output_type="latent")."""
import pytest
import torch
from d2g_helpers import one_thread

pytest.importorskip("diffusers")  # the GPU machine may lack it
pytest.importorskip("transformers")

from diffusers import DDIMScheduler  # noqa: E402

from d2g_fast.teacher import NonFiniteLatentError, Teacher  # noqa: E402
from d2g_fast.teacher.schedulers import scheduler_class  # noqa: E402
from d2g_fast.testing import (save_tiny_sd_pipeline, tiny_sd_pipeline,  # noqa: E402
                              tiny_sdxl_pipeline)


@pytest.fixture(autouse=True)
def _one_thread_teacher():
    with one_thread():
        yield


PROMPTS = ["a red fox in the snow", "the lighthouse on a cliff", "x"]


def _noise(teacher, n, seed=0):
    return torch.randn(n, *teacher.latent_shape, generator=torch.Generator().manual_seed(seed))


def _ddim_pipe(kind, prediction_type="epsilon"):
    pipe = tiny_sdxl_pipeline() if kind == "sdxl" else tiny_sd_pipeline(
        prediction_type=prediction_type)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def _assert_close(ours, ref, atol, what):
    err = (ours - ref).abs().max().item()
    assert err <= atol, f"{what}: max |ours - diffusers| = {err:.3g} > {atol} " \
                        f"(|ref| max {ref.abs().max().item():.3g})"


@pytest.mark.parametrize("kind,prediction_type,guidance,negative", [
    ("sd", "epsilon", 7.0, None),
    ("sd", "v_prediction", 3.0, "blurry"),
    ("sd", "epsilon", 1.0, None),      # no guidance: one unbatched pass
    ("sdxl", "epsilon", 7.0, None),    # zeros for the empty negative prompt
    ("sdxl", "epsilon", 5.0, "ugly"),
])
def test_teacher_sample_equals_diffusers_pipeline(kind, prediction_type, guidance, negative):
    pipe = _ddim_pipe(kind, prediction_type)
    teacher = Teacher.from_pipeline(pipe)
    noise = _noise(teacher, len(PROMPTS))
    ref = pipe(PROMPTS, latents=noise.clone(), num_inference_steps=4, guidance_scale=guidance,
               negative_prompt=[negative] * len(PROMPTS) if negative else None,
               output_type="latent").images
    ours = teacher.sample(noise, PROMPTS, steps=4, guidance=guidance, negative_prompt=negative)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert ref.abs().max() > 0.1, "degenerate reference"
    _assert_close(ours, ref, 1e-5, f"{kind}/{prediction_type}/g={guidance}/neg={negative}")


def test_teacher_other_scheduler_matches_pipeline():
    pipe = tiny_sd_pipeline()
    teacher = Teacher.from_pipeline(pipe)
    pipe.scheduler = scheduler_class("euler").from_config(pipe.scheduler.config)
    noise = _noise(teacher, 2, seed=3)
    ref = pipe(PROMPTS[:2], latents=noise.clone(), num_inference_steps=4, guidance_scale=4.0,
               output_type="latent").images
    ours = teacher.sample(noise, PROMPTS[:2], steps=4, guidance=4.0, scheduler="euler")
    _assert_close(ours, ref, 1e-5, "euler")


def test_teacher_latent_shape_and_resolution():
    teacher = Teacher.from_pipeline(tiny_sd_pipeline())
    assert teacher.latent_shape == (4, 8, 8)
    assert (teacher.height, teacher.width) == (16, 16)
    wide = Teacher.from_pipeline(tiny_sd_pipeline(), resolution=(16, 24))
    assert wide.latent_shape == (4, 8, 12)
    with pytest.raises(ValueError, match="resolution"):
        Teacher.from_pipeline(tiny_sd_pipeline(), resolution=15)


def test_teacher_from_pretrained_and_identity(tmp_path):
    path = save_tiny_sd_pipeline(str(tmp_path / "sd"))
    loaded = Teacher.from_pretrained(path)
    direct = Teacher.from_pipeline(tiny_sd_pipeline())
    assert loaded.identity()["sha256"] == direct.identity()["sha256"]
    assert loaded.identity()["source"] == str(tmp_path / "sd")
    other = Teacher.from_pipeline(tiny_sd_pipeline(seed=5))
    assert other.identity()["sha256"] != direct.identity()["sha256"]
    noise = _noise(loaded, 2)
    a = loaded.sample(noise, PROMPTS[:2], steps=3, guidance=6.0)
    b = direct.sample(noise, PROMPTS[:2], steps=3, guidance=6.0)
    assert torch.equal(a, b), f"max diff {(a - b).abs().max()}"
    with pytest.raises(FileNotFoundError, match="--teacher"):
        Teacher.from_pretrained(str(tmp_path / "nothing"))


def test_teacher_refuses_non_finite_latents():
    pipe = tiny_sd_pipeline()
    with torch.no_grad():
        pipe.unet.conv_out.bias[0] = float("nan")
    teacher = Teacher.from_pipeline(pipe)
    with pytest.raises(NonFiniteLatentError, match="NaN/Inf"):
        teacher.sample(_noise(teacher, 2), PROMPTS[:2], steps=2, guidance=3.0)


def test_teacher_bad_arguments():
    teacher = Teacher.from_pipeline(tiny_sd_pipeline())
    with pytest.raises(ValueError, match="noise"):
        teacher.sample(torch.randn(2, 4, 8, 9), PROMPTS[:2], steps=2)
    with pytest.raises(ValueError, match="prompts"):
        teacher.sample(_noise(teacher, 2), PROMPTS[:3], steps=2)
    with pytest.raises(ValueError, match="steps"):
        teacher.sample(_noise(teacher, 2), PROMPTS[:2], steps=0)
    with pytest.raises(ValueError, match="--scheduler"):
        teacher.make_scheduler("no-such-sampler")
    with pytest.raises(ValueError, match="--dtype"):
        teacher.to(dtype="float8")


def test_teacher_counts_truncated_prompts():
    teacher = Teacher.from_pipeline(tiny_sdxl_pipeline())
    long = "word " * 100
    assert teacher.count_truncated(["short", long, long + "x", "also short"]) == 2
    assert teacher.max_prompt_tokens() == 77
