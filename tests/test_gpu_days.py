"""`d2g bench gpu-days`: the tiny run end to end on the CPU, the derived arithmetic, bad input,
the architecture configs and the providers' equivalence."""
import csv
import math
import os
import re

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("matplotlib")

from d2g_helpers import one_thread  # noqa: E402

from d2g_fast import cli  # noqa: E402
from d2g_fast.bench import archs  # noqa: E402
from d2g_fast.bench.gpu_days import SECONDS_PER_DAY, SOURCES, Row, Settings, derive  # noqa: E402


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_days")
    with one_thread():
        rc = cli.main(["bench", "gpu-days", "--arch", "tiny", "--out", str(out)])
    return rc, out


def test_tiny_run_writes_csv_markdown_png(tiny_run):
    rc, out = tiny_run
    assert rc == 0
    for name in ("gpu_days.csv", "gpu_days.md", "gpu_days.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "gpu_days.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "gpu_days.md").read_text()
    assert "d2g bench gpu-days --arch tiny" in md and "Not measured on this device" in md
    assert "PARTIAL" not in md


def test_every_row_has_a_source_and_derived_rows_name_existing_rows(tiny_run):
    _, out = tiny_run
    rows = _read_csv(out / "gpu_days.csv")
    names = {r["name"] for r in rows}
    assert len(names) == len(rows), "row names must be unique"
    for r in rows:
        assert r["source"] in SOURCES, r
        assert r["detail"], f"{r['name']}: no detail (how it was measured, cited or derived)"
        if r["source"] == "derived":
            referenced = set(re.findall(r"\b(?:recipe|collect|train|loss|memory)\.[\w.+-]+",
                                        r["detail"]))
            assert referenced, f"{r['name']}: a derived row must name the rows it comes from"
            for ref in referenced:
                base = ref[len("recipe."):] if ref.startswith("recipe.") else ref
                assert ref in names or base in names, f"{r['name']} refers to unknown {ref}"
        if r["source"] == "cited":
            assert "arXiv" in r["detail"] or "project page" in r["detail"], r
    # What a CPU can measure was measured.
    for name in ("collect.diffusers", "collect.ours", "train.fused.fp32", "train.ref.fp32",
                 "loss.e-latentlpips", "loss.pixel-lpips"):
        row = next(r for r in rows if r["name"] == name)
        assert row["source"] == "measured" and float(row["value"]) > 0, row
    # ... and nothing a CPU cannot measure appears (CUDA graphs, compile, bf16 are omitted).
    assert not names & {"collect.ours-graphs", "collect.ours-compiled", "train.fused.bf16",
                        "saving.cuda_graphs", "saving.compile", "saving.bf16"}


def test_recipe_rows_follow_from_measured_rows(tiny_run):
    _, out = tiny_run
    value = {r["name"]: float(r["value"]) for r in _read_csv(out / "gpu_days.csv")}
    # The tiny model's collection is timed at 10 of the 50 steps and extrapolated.
    assert value["recipe.collect.ours"] == pytest.approx(
        3e6 * 50 / 10 / value["collect.ours"] / SECONDS_PER_DAY, rel=1e-12)
    assert value["recipe.train.fused.fp32"] == pytest.approx(
        20000 * 1024 / value["train.fused.fp32"] / SECONDS_PER_DAY, rel=1e-12)
    assert value["recipe.total.ours"] == pytest.approx(
        value["recipe.collect.ours"] + value["recipe.train.fused.fp32"], rel=1e-12)


def _measured(name, value):
    return Row(name, "x", name, value, "u", "measured", "test")


def test_derive_extrapolates_steps_and_computes_savings(tmp_path):
    s = Settings(arch="sd15", out=str(tmp_path), pairs=1e6, steps=50, iters=1000, batch=64,
                 quick=True, device="cpu", train_batch=8)  # --quick times 10 steps of 50
    measured = [_measured("collect.diffusers", 2.0), _measured("collect.ours", 4.0),
                _measured("train.fused.fp32", 16.0), _measured("train.ref.fp32", 8.0),
                _measured("loss.pixel-lpips", 30.0), _measured("loss.e-latentlpips", 10.0)]
    value = {r.name: r.value for r in derive(s, measured)}
    # 1e6 pairs at 5x the measured steps, 4 pairs/s: 1.25e6 s.
    assert value["recipe.collect.ours"] == pytest.approx(1e6 * 5 / 4.0 / SECONDS_PER_DAY)
    assert value["recipe.train.ref.fp32"] == pytest.approx(1000 * 64 / 8.0 / SECONDS_PER_DAY)
    assert value["saving.collector"] == pytest.approx(2.0)
    assert value["saving.fused_kernels"] == pytest.approx(2.0)
    assert value["saving.fused_kernels.days"] == pytest.approx(
        1000 * 64 * (1 / 8.0 - 1 / 16.0) / SECONDS_PER_DAY)
    assert value["saving.latent_loss"] == pytest.approx(3.0)
    # (30 - 10) ms per loss batch of 8, 1000 x 64 samples: 8000 batches.
    assert value["saving.latent_loss.days"] == pytest.approx(0.020 * 8000 / SECONDS_PER_DAY)
    assert value["recipe.total.plain"] == pytest.approx(
        value["recipe.collect.diffusers"] + value["recipe.train.ref.fp32"])
    assert "saving.bf16" not in value and "saving.cuda_graphs" not in value


def test_a_run_stopped_midway_keeps_what_it_measured(tmp_path, monkeypatch):
    from d2g_fast.bench import gpu_days

    monkeypatch.setattr(gpu_days, "measure_collection",
                        lambda s, p: [_measured("collect.ours", 4.0)])
    monkeypatch.setattr(gpu_days, "measure_loss", lambda s, p: [])

    def killed(s, p):
        raise KeyboardInterrupt  # as a time limit stops the run
    monkeypatch.setattr(gpu_days, "measure_training", killed)
    with pytest.raises(KeyboardInterrupt):
        gpu_days.run_gpu_days(Settings(arch="tiny", out=str(tmp_path), device="cpu",
                                       levers=False))  # its 5 plan simulations: not tested here
    assert "PARTIAL" in (tmp_path / "gpu_days.md").read_text()
    names = {r["name"] for r in _read_csv(tmp_path / "gpu_days.csv")}
    assert {"collect.ours", "recipe.collect.ours", "published.dmd2_sd15"} <= names


@pytest.mark.parametrize("flags", [[], ["--no-levers"]], ids=["default", "no-levers"])
def test_no_levers_skips_the_lever_stage_and_says_so(tmp_path, monkeypatch, flags):
    from d2g_fast.bench import gpu_days

    calls = []
    monkeypatch.setattr(gpu_days, "measure_levers", lambda s, p: calls.append(s) or [])
    for stage in ("measure_collection", "measure_loss", "measure_training"):  # time nothing
        monkeypatch.setattr(gpu_days, stage, lambda s, p: [])
    with one_thread():
        assert cli.main(["bench", "gpu-days", "--arch", "tiny", "--out", str(tmp_path),
                         *flags]) == 0
    md = (tmp_path / "gpu_days.md").read_text()
    skipped = "each memory lever's peak per GPU (d2g plan): skipped (--no-levers)"
    if flags:
        assert not calls and skipped in md and "--no-levers`" in md
    else:
        assert len(calls) == 1 and calls[0].levers and skipped not in md


def test_row_rejects_an_unknown_source():
    with pytest.raises(ValueError, match="source"):
        Row("a", "b", "c", 1.0, "u", "guessed", "d")


@pytest.mark.parametrize("argv, flag", [
    (["--pairs", "0"], "--pairs"),
    (["--steps", "-1"], "--steps"),
    (["--train-batch", "0"], "--train-batch"),
    (["--device", "tpu"], "--device"),
    (["--compile", "--device", "cpu"], "--compile"),
])
def test_bad_input_names_the_flag(tmp_path, capsys, argv, flag):
    rc = cli.main(["bench", "gpu-days", "--arch", "tiny", "--out", str(tmp_path / "o"), *argv])
    assert rc == 2
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "o").exists(), "bad input must be refused before anything is written"


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("keep me")
    assert cli.main(["bench", "gpu-days", "--arch", "tiny", "--out", str(path)]) == 2
    assert "--out" in capsys.readouterr().err and path.read_text() == "keep me"


def test_unknown_arch_is_refused(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "gpu-days", "--arch", "sd9", "--out", "x"])
    assert "--arch" in capsys.readouterr().err


@pytest.mark.parametrize("arch, params_m, cross_dim, prediction", [
    ("sd15", 860, 768, "epsilon"), ("sd21", 866, 1024, "v_prediction"),
    ("sdxl", 2567, 2048, "epsilon")])
def test_architecture_configs_have_the_released_sizes(arch, params_m, cross_dim, prediction):
    # Built on the meta device: shapes only, no memory, no weights.
    comps = archs.components(arch, device="meta")
    unet = comps["unet"]
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6) == params_m
    assert unet.config.cross_attention_dim == cross_dim
    assert unet.config.sample_size == archs.latent_shape(arch)[1]
    assert comps["scheduler"].config.prediction_type == prediction
    hidden = comps["text_encoder"].config.hidden_size + (
        comps["text_encoder_2"].config.hidden_size if "text_encoder_2" in comps else 0)
    assert hidden == cross_dim


def test_collection_providers_compute_the_same_pairs():
    """The speed comparison is of the same work: ours and diffusers' loop give the same latents."""
    from d2g_fast.bench.collect_speed import make_collect_fn

    with one_thread():
        outs = [make_collect_fn(p, archs.components("tiny"), device="cpu", batch=2, steps=3)()
                for p in ("diffusers", "ours")]
    assert outs[0].shape == (2, *archs.latent_shape("tiny"))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_kernels_context_sets_and_restores_d2g_impl(monkeypatch):
    from d2g_fast.bench.train_speed import kernels

    monkeypatch.setenv("D2G_IMPL", "cpu")
    with kernels("ref"):
        assert os.environ["D2G_IMPL"] == "ref"
    assert os.environ["D2G_IMPL"] == "cpu"
    with kernels("fused"):
        assert "D2G_IMPL" not in os.environ
    assert os.environ["D2G_IMPL"] == "cpu"
    with pytest.raises(ValueError, match="kernels"):
        with kernels("fast"):
            pass


def test_step_timing_amortizes_r1():
    from d2g_fast.bench.train_speed import StepTiming

    t = StepTiming(plain_s=1.0, r1_s=2.6, r1_interval=16, peak_mem_gb=None, batch=4)
    assert t.amortized_s == pytest.approx(1.1)
    assert t.samples_per_s == pytest.approx(4 / 1.1)
    assert math.isclose(StepTiming(1.0, None, 16, None, 4).amortized_s, 1.0)


@pytest.mark.cuda
def test_tiny_run_on_the_gpu_measures_bf16_and_cuda_graphs(tmp_path, cuda_device):
    assert cli.main(["bench", "gpu-days", "--arch", "tiny", "--out", str(tmp_path),
                     "--device", "cuda"]) == 0
    rows = {r["name"]: r for r in _read_csv(tmp_path / "gpu_days.csv")}
    for name in ("collect.ours-graphs", "train.fused.bf16", "train.ref.bf16", "train.fused.fp32",
                 "train.fused.bf16.peak_mem", "loss.e-latentlpips.peak_mem"):
        assert rows[name]["source"] == "measured" and float(rows[name]["value"]) > 0, name
    for name in ("saving.cuda_graphs", "saving.bf16", "saving.fused_kernels", "recipe.total.ours"):
        assert rows[name]["source"] == "derived", name
