"""The ablation switches of the trainer (regression losses, discriminator parts) and
``d2g toy ablate --quick`` end to end (every row produced, the report written, resumable)."""
import json
import math
import os

import pytest
import torch

from d2g_helpers import one_thread

pytest.importorskip("diffusers")

from d2g_fast.losses.regression import (PSEUDO_HUBER_C, LatentLPIPSLoss, MSELoss,  # noqa: E402
                                        PseudoHuberLoss, make_regression_loss)
from d2g_fast.train import TrainConfig  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


# ----------------------------------------------------------------------------- losses
def test_mse_and_pseudo_huber_against_hand_computed_values():
    fake = torch.zeros(2, 4, 2, 2)
    target = torch.zeros(2, 4, 2, 2)
    target[0, 0, 0, 0] = 3.0
    target[1] = 1.0  # 16 ones
    assert torch.allclose(MSELoss()(fake, target), torch.tensor([9 / 16, 1.0]))
    c = PSEUDO_HUBER_C * 4.0  # sqrt(16 elements)
    expected = torch.tensor([math.sqrt(9 + c * c) - c, math.sqrt(16 + c * c) - c])
    assert torch.allclose(PseudoHuberLoss()(fake, target), expected)
    assert PseudoHuberLoss()(target, target).abs().max() < 1e-12


class _FakeLPIPS(torch.nn.Module):
    def __init__(self, augment):
        super().__init__()
        self.augment, self.calls = augment, []

    def forward(self, a, b, ensembling=True):
        self.calls.append(ensembling)
        return (a - b).abs().mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)


def test_latentlpips_ensembles_only_with_an_augmentation():
    x, y = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    for augment, ensembling in (("bg", True), (None, False)):
        inner = _FakeLPIPS(augment)
        out = LatentLPIPSLoss(inner)(x, y)
        assert out.shape == (3,) and inner.calls == [ensembling]
    with pytest.raises(ValueError, match="--regression-loss"):
        make_regression_loss("l2", None, "")


def test_pixel_lpips_decodes_with_the_vae_and_backpropagates_into_the_fake_only():
    from d2g_fast import toy

    loss = make_regression_loss("pixel_lpips", None, str(toy.teacher_dir()))
    assert not any(p.requires_grad for p in loss.parameters())
    target = torch.randn(2, 4, 8, 8)
    fake = target.clone().requires_grad_(True)
    assert loss(fake, target).abs().max() < 1e-6  # identical latents: distance 0
    fake = (target + torch.randn(2, 4, 8, 8)).requires_grad_(True)
    d = loss(fake, target)
    d.sum().backward()
    assert d.shape == (2,) and (d > 0).all() and fake.grad.abs().sum() > 0


def test_bad_regression_loss_is_refused_by_flag():
    with pytest.raises(ValueError, match="--regression-loss"):
        TrainConfig(teacher="t", pairs="p", out="o", regression_loss="l2").validate()


# ----------------------------------------------------------------------------- D switches
@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    from d2g_fast.teacher import Teacher
    from d2g_fast.testing import save_tiny_sd_pipeline

    folder = save_tiny_sd_pipeline(str(tmp_path_factory.mktemp("abl") / "teacher"), seed=0)
    return folder, Teacher.from_pretrained(folder)


def test_discriminator_switches_remove_their_parts(tiny_teacher):
    from d2g_fast.train.build import make_discriminator

    folder, teacher = tiny_teacher
    full = make_discriminator(teacher, TrainConfig(teacher=folder))
    assert full.noise_conv is not None and full.input_convs is not None
    assert len(full.head_names) > 1
    bare = make_discriminator(teacher, TrainConfig(
        teacher=folder, d_noise_off=True, d_multiscale_input_off=True,
        d_multiscale_output_off=True))
    assert bare.noise_conv is None and bare.input_convs is None
    assert len(bare.head_names) == 1


def test_regression_only_leaves_the_discriminator_untouched(tiny_teacher):
    from d2g_fast.train.build import build_run
    from d2g_fast.train.step import train_step

    folder, teacher = tiny_teacher
    shape = tuple(teacher.latent_shape)
    batch = {"noise": torch.randn(2, *shape), "latent": torch.randn(2, *shape),
             "prompt": ["a cat", "a dog"]}
    for lambda_gan, mse in ((0.0, "mse"), (0.1, "e_latentlpips")):
        config = TrainConfig(teacher=folder, pairs="unused", out="unused", lpips_random=True,
                             lambda_gan=lambda_gan, regression_loss=mse, device="cpu",
                             progress=False).validate()
        run = build_run(config, teacher=teacher)
        before = [p.detach().clone() for p in run.d_params]
        out = train_step(run, batch, 0)
        moved = any(not torch.equal(a, b) for a, b in zip(before, run.d_params))
        assert moved == (lambda_gan > 0)
        assert (out["d_loss"] is None) == (lambda_gan == 0)
        if mse == "mse":
            assert out["e_latentlpips"] > 0  # the column logs the regression loss's value


# ----------------------------------------------------------------------------- d2g toy ablate
def test_toy_ablate_quick_produces_every_row_and_the_report(tmp_path, capsys):
    from d2g_fast.cli import main
    from d2g_fast.toy.ablate import ROW_NAMES

    out = tmp_path / "ablation"
    assert main(["toy", "ablate", "--quick", "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["rows"]) == list(ROW_NAMES)
    report = (out / "report.md").read_text()
    for name, row in metrics["rows"].items():
        assert (out / "rows" / f"{name}_seed0.json").is_file()
        assert row["label"] in report and row["paper"] in report
        for key in ("fd", "accuracy", "e_latentlpips", "seconds_per_step",
                    "attribute_accuracy.position", "diversity_features",
                    "diversity_e_latentlpips", "precision", "recall"):
            assert math.isfinite(row[key]["mean"]), (name, key)
    assert (out / "ablation_loss.png").is_file() and (out / "ablation_discriminator.png").is_file()
    # Resumable per row: a finished row is read back, not retrained.
    row_file = out / "rows" / "mse_seed0.json"
    stamp = os.stat(row_file).st_mtime_ns
    assert main(["toy", "ablate", "--quick", "--out", str(out), "--no-progress",
                 "--rows", "mse"]) == 0
    assert os.stat(row_file).st_mtime_ns == stamp
    # Other settings in the same folder: refused, naming the way out.
    assert main(["toy", "ablate", "--quick", "--iters", "3", "--out", str(out),
                 "--no-progress"]) == 2
    assert "another --out" in capsys.readouterr().err


def test_demo_report_points_at_the_ablation_tables(tmp_path):
    from d2g_fast.demo import append_ablation_note

    report = tmp_path / "report.md"
    report.write_text("# demo\n", encoding="utf-8")
    append_ablation_note(str(report))
    text = report.read_text(encoding="utf-8")
    assert text.startswith("# demo\n") and "d2g toy ablate" in text
    assert "benchmarks/RESULTS.md" in text
    # the recorded full run it names is in the repository
    import re

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    named = re.findall(r"`(benchmarks/results/[^`]+)`", text)
    assert named and all(os.path.isfile(os.path.join(repo, p)) for p in named), named


def test_each_row_switches_on_exactly_its_parts(tmp_path):
    from d2g_fast.toy.ablate import ROWS, AblateSettings, row_config

    s = AblateSettings()
    configs = {r[0]: row_config(r, s, 0, tmp_path, "pairs", "out", False) for r in ROWS}
    for name in ("mse", "pseudo_huber", "pixel_lpips", "latentlpips", "e_latentlpips"):
        assert configs[name].lambda_gan == 0.0, name
    assert configs["mse"].regression_loss == "mse"
    assert configs["latentlpips"].augment == "none"
    assert configs["e_latentlpips"].augment == "bg"
    full = configs["mix_and_match"]
    assert full.lambda_gan == s.lambda_gan and full.r1_gamma == s.r1_gamma
    assert full.mix_fraction == s.mix_fraction
    assert not (full.d_noise_off or full.d_multiscale_input_off or full.d_multiscale_output_off)
    bare = configs["diffusion_d"]
    assert bare.lambda_gan == s.lambda_gan and bare.r1_gamma == 0 and bare.mix_fraction == 0
    assert bare.d_noise_off and bare.d_multiscale_input_off and bare.d_multiscale_output_off
    assert not configs["z_conditioning"].d_noise_off and configs["z_conditioning"].r1_gamma == 0
    assert configs["r1"].r1_gamma == s.r1_gamma and configs["r1"].d_multiscale_output_off
    assert not configs["multiscale"].d_multiscale_output_off
    assert configs["multiscale"].mix_fraction == 0


def test_demo_and_ablation_train_the_full_method_with_one_recipe(tmp_path):
    """demo.DEFAULTS is the one source of the recipe: the demo's student and the ablation's
    full-method row get the same trainer settings from it."""
    import argparse

    from d2g_fast.demo import DEFAULTS, resolve, train_config
    from d2g_fast.toy.ablate import ROWS, AblateSettings, row_config

    args = argparse.Namespace(pairs=None, steps=None, iters=None, eval_n=None, quick=False,
                              batch_size=DEFAULTS["batch_size"], lr=DEFAULTS["lr"], seed=0,
                              toy_dir=None, precision="fp32", no_progress=True)
    demo = train_config(str(tmp_path), "run", "pairs", resolve(args), args,
                        DEFAULTS["lambda_gan"])
    world = tmp_path / "world"
    full = row_config(ROWS[-1], AblateSettings(), 0, world, "pairs", "out", False)
    for name in ("max_steps", "batch_size", "lr_g", "lr_d", "lambda_gan", "warmup_steps",
                 "ema_decay", "r1_gamma", "r1_interval", "mix_fraction", "augment",
                 "overlap_phases"):
        assert getattr(demo, name) == getattr(full, name), name
    assert demo.max_steps == DEFAULTS["iters"] and demo.ema_decay == DEFAULTS["ema_decay"]
    assert demo.warmup_steps == int(DEFAULTS["iters"] * DEFAULTS["warmup_frac"])
    assert demo.lr_d == (DEFAULTS["lr_d"] or DEFAULTS["lr"])
    slow_d = train_config(str(tmp_path), "run", "pairs", resolve(args), args, 0.2,
                          {"lr_d": 1e-4, "r1_gamma": 1.0, "warmup_frac": 0.25})
    assert (slow_d.lr_d, slow_d.r1_gamma, slow_d.lambda_gan) == (1e-4, 1.0, 0.2)
    assert slow_d.warmup_steps == int(DEFAULTS["iters"] * 0.25)
