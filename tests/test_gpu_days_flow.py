"""`d2g bench gpu-days` for flow-matching transformer teachers: the published SD3-medium and
FLUX.1-dev configs (meta device: parameter counts and model-state memory per GPU, replicated and
FSDP2), and the tiny FLUX-shaped run measured end to end on the CPU."""
import csv

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("matplotlib")

from d2g_helpers import one_thread  # noqa: E402

from d2g_fast import cli  # noqa: E402
from d2g_fast.bench import archs, memory  # noqa: E402
from d2g_fast.bench.gpu_days import Row  # noqa: E402

GIB = 2.0 ** 30


@pytest.mark.parametrize("arch,transformer,texts", [
    # published sizes: SD3-medium MMDiT 2.03 B; CLIP-L 124 M (with projection), OpenCLIP bigG
    # 695 M, T5-XXL encoder 4.76 B; FLUX.1-dev 11.9 B with CLIP-L 123 M and T5-XXL
    ("sd3-medium", 2_028_328_000, (123_650_304, 694_659_840, 4_762_310_656)),
    ("flux-dev", 11_901_408_320, (123_060_480, 4_762_310_656))])
def test_published_configs_on_the_meta_device(arch, transformer, texts):
    nets = archs.meta_networks(arch)
    assert next(nets["denoiser"].parameters()).device.type == "meta"
    assert sum(p.numel() for p in nets["denoiser"].parameters()) == transformer
    assert tuple(sum(p.numel() for p in m.parameters()) for m in nets["text_encoders"]) == texts


def test_memory_rows_arithmetic():
    rows = {r.name: r for r in memory.memory_rows("flux-dev", Row)}
    n = memory.parameter_counts("flux-dev")
    assert n["generator"] == n["teacher_network"] == 11_901_408_320
    # D: the whole transformer but its output layers (norm_out, proj_out: frozen), plus the
    # zero-initialised noise embedder (3072 x 64 + 3072) and 12 heads of 3072 weights + biases
    assert n["discriminator_frozen"] == 3072 * 6144 + 6144 + 3072 * 64 + 64
    assert n["discriminator_trainable"] + n["discriminator_frozen"] == \
        n["generator"] + (3072 * 64 + 3072) + 12 * 3072 + 12
    state = 20 * n["generator"] + 16 * n["discriminator_trainable"] + \
        4 * n["discriminator_frozen"]
    teacher = 4 * (n["teacher_network"] + n["text_encoders"])
    assert rows["memory.replicated"].value == pytest.approx((state + teacher) / GIB)
    assert rows["memory.fsdp8"].value == pytest.approx((state / 8 + teacher) / GIB)
    assert rows["memory.fsdp64"].value == pytest.approx((state / 64 + teacher) / GIB)
    assert 450 < rows["memory.replicated"].value < 470   # 461 GiB: no single GPU holds it
    for r in rows.values():
        assert r.source == ("measured" if r.name.startswith("memory.params.") else "derived")


def test_tiny_flux_run_measures_every_stage_on_the_cpu(tmp_path):
    with one_thread():
        assert cli.main(["bench", "gpu-days", "--arch", "tiny-flux", "--out",
                         str(tmp_path)]) == 0
    with open(tmp_path / "gpu_days.csv", newline="", encoding="utf-8") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    for name in ("collect.diffusers", "collect.ours", "train.fused.fp32", "train.ref.fp32",
                 "loss.e-latentlpips", "memory.params.generator", "memory.fsdp8",
                 "recipe.total.ours"):
        assert name in rows, name
        assert float(rows[name]["value"]) > 0, name
    assert rows["collect.ours"]["source"] == "measured"
    assert "FLUX" in rows["collect.ours"]["detail"]


def test_flow_arch_info_matches_the_families():
    from d2g_fast.teacher.families import FluxFamily, SD3Family

    assert archs.ARCH_INFO["sd3-medium"].lpips_encoder == SD3Family.lpips_encoder
    assert archs.ARCH_INFO["flux-dev"].lpips_encoder == FluxFamily.lpips_encoder
    t = archs.teacher("tiny-flux")
    assert tuple(t.latent_shape) == archs.latent_shape("tiny-flux")
    t = archs.teacher("tiny-sd3")
    assert tuple(t.latent_shape) == archs.latent_shape("tiny-sd3")
