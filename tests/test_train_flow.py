"""The distillation trainer on flow-matching transformer teachers (tiny random SD3- and
FLUX-shaped pipelines built here): it learns, resumes exactly after SIGKILL, 2 processes give
what 1 process with 2 micro-batches gives (replicated; FSDP2 with D2G_TEST_FLOW_SLOW=1), the
E-LatentLPIPS latent space comes from the teacher's VAE, and bad input is refused by name."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
from d2g_helpers import assert_resume_after_sigkill_while_writing_is_exact, one_thread
from d2g_helpers import weights_apart

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from test_train import (_assert_same_metrics, _cli_args, _distill, _distill_cmd, _env,  # noqa: E402
                        _rows, _torchrun, _without_timings)

from d2g_fast.cli import main as d2g_main  # noqa: E402
from d2g_fast.testing.tiny import save_tiny_flux_pipeline, save_tiny_sd3_pipeline  # noqa: E402
from d2g_fast.train import TrainConfig, train  # noqa: E402

SLOW = os.environ.get("D2G_TEST_FLOW_SLOW") == "1"


@pytest.fixture(autouse=True)
def _one_thread_train():
    with one_thread():
        yield


def _world(root, kind):
    folder = os.path.join(root, kind)
    if kind == "sd3":
        save_tiny_sd3_pipeline(folder)
    else:
        save_tiny_flux_pipeline(folder)
    pairs = os.path.join(root, "pairs")
    assert d2g_main(["collect", "--teacher", folder, "--num-pairs", "40", "--steps", "4",
                     "--resolution", "16", "--batch-size", "8", "--shard-size", "16",
                     "--guidance", "3", "--no-progress", "--out", pairs]) == 0
    return folder, pairs


@pytest.fixture(scope="module")
def sd3_world(tmp_path_factory):
    with one_thread():
        return _world(str(tmp_path_factory.mktemp("train_sd3")), "sd3")


@pytest.fixture(scope="module")
def flux_world(tmp_path_factory):
    with one_thread():
        return _world(str(tmp_path_factory.mktemp("train_flux")), "flux")


def _config(world, out, **kw):
    teacher, pairs = world
    base = dict(teacher=teacher, pairs=pairs, out=str(out), lpips_random=True, batch_size=4,
                max_steps=6, log_every=1, checkpoint_every=2, lr_g=3e-4, lr_d=1e-4,
                lambda_gan=0.1, r1_interval=2, progress=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------ learning
@pytest.mark.parametrize("world_name", ["sd3_world", "flux_world"])
def test_training_lowers_heldout_elatentlpips(world_name, request, tmp_path):
    world = request.getfixturevalue(world_name)
    config = _config(world, tmp_path / "run", max_steps=16, log_every=4, checkpoint_every=16,
                     val_pairs=8, batch_size=8, ema_decay=0.0)
    train(config, log=lambda *a: None)
    rows = _rows(config.out)
    val = [float(r["val_e_latentlpips"]) for r in rows]
    assert len(val) == 4
    # Held-out pairs are never trained on (measured: 0.116 -> 0.063 for SD3, 0.080 -> 0.052 for
    # FLUX over 16 steps).
    assert val[-1] < 0.8 * val[0], val
    for r in rows:   # G and D both trained
        assert math.isfinite(float(r["e_latentlpips"])) and math.isfinite(float(r["d_loss"]))
    # D is the transformer discriminator with the family's default taps
    with open(os.path.join(config.out, "config.json")) as f:
        assert json.load(f)["d_taps"] == []


def test_each_family_names_its_discriminator():
    """The family, not the network's class name, says which D the trainer builds."""
    from d2g_fast.models import DiffusionDiscriminator
    from d2g_fast.models.transformer_discriminator import FluxDiscriminator, SD3Discriminator
    from d2g_fast.teacher.families import FAMILIES, TeacherFamily

    assert {name: cls.discriminator_class() for name, cls in FAMILIES.items()} == {
        "sd": DiffusionDiscriminator, "sdxl": DiffusionDiscriminator,
        "sd3": SD3Discriminator, "flux": FluxDiscriminator}

    class NoDiscriminator(TeacherFamily):
        name = "new"

    with pytest.raises(NotImplementedError, match="the new teacher family's UNet has no disc"):
        NoDiscriminator.discriminator_class()


def test_transformer_discriminator_built_from_the_family(sd3_world, flux_world, tmp_path):
    from d2g_fast.models import TransformerDiscriminator
    from d2g_fast.teacher import load_teacher
    from d2g_fast.train.build import make_discriminator

    for world in (sd3_world, flux_world):
        teacher = load_teacher(world[0], resolution=16)
        d = make_discriminator(teacher, _config(world, tmp_path / "x"))
        assert isinstance(d, TransformerDiscriminator)
        assert type(d) is teacher.discriminator_class()
        assert d.taps == teacher.default_taps(teacher.denoiser)
        assert [id(b) for b in d.blocks()] != [id(b) for b in teacher.blocks(teacher.denoiser)]
        assert len(d.blocks()) == len(teacher.blocks(teacher.denoiser))
        d = make_discriminator(teacher, _config(world, tmp_path / "x", d_taps=[0]), guidance=5.0)
        assert d.taps == [0] and len(d.head_names) == 3
        # FLUX-dev's D embeds the collection guidance, as G does
        assert d.config.guidance == (5.0 if world is flux_world else 3.5)


@pytest.mark.parametrize("world_name", ["sd3_world", "flux_world"])
def test_checkpointing_and_stored_embeddings_change_nothing(world_name, request, tmp_path):
    """Gradient checkpointing (G's transformer and D's blocks) recomputes the same numbers; a
    store holding the T5/CLIP embeddings trains as one whose prompts are encoded per batch."""
    teacher_dir, pairs = request.getfixturevalue(world_name)
    stored = str(tmp_path / "pairs_emb")
    assert d2g_main(["collect", "--teacher", teacher_dir, "--num-pairs", "40", "--steps", "4",
                     "--resolution", "16", "--batch-size", "8", "--shard-size", "16",
                     "--guidance", "3", "--no-progress", "--store-embeddings",
                     "--out", stored]) == 0
    plain = _config((teacher_dir, pairs), tmp_path / "plain", max_steps=2)
    train(plain, log=lambda *a: None)
    variant = _config((teacher_dir, stored), tmp_path / "variant", max_steps=2,
                      gradient_checkpointing=True)
    train(variant, log=lambda *a: None)
    assert _without_timings(_rows(variant.out)) == _without_timings(_rows(plain.out))


def test_bf16_runs(flux_world, tmp_path):
    config = _config(flux_world, tmp_path / "bf16", max_steps=2, precision="bf16")
    train(config, log=lambda *a: None)
    rows = _rows(config.out)
    assert rows and all(math.isfinite(float(r["e_latentlpips"])) for r in rows)
    assert all(math.isfinite(float(r["d_loss"])) for r in rows)


# ------------------------------------------------------------------------------ E-LatentLPIPS
def test_lpips_encoder_follows_the_teachers_vae(sd3_world, flux_world, tmp_path):
    from d2g_fast.teacher import load_teacher
    from d2g_fast.train.build import lpips_encoder, lpips_encoders_for_vae

    assert lpips_encoders_for_vae({"latent_channels": 16, "shift_factor": 0.0609,
                                   "scaling_factor": 1.5305}) == ["sd3"]
    assert lpips_encoders_for_vae({"latent_channels": 16, "shift_factor": 0.1159,
                                   "scaling_factor": 0.3611}) == ["flux"]
    assert lpips_encoders_for_vae({"latent_channels": 4, "scaling_factor": 0.13025}) == ["sdxl"]
    assert lpips_encoders_for_vae({"latent_channels": 4, "scaling_factor": 0.18215}) == \
        ["sd15", "sd21"]
    assert lpips_encoders_for_vae({"latent_channels": 16, "shift_factor": 0.0609,
                                   "scaling_factor": 0.3611}) == []
    for world, name in ((sd3_world, "sd3"), (flux_world, "flux")):
        teacher = load_teacher(world[0], resolution=16)
        config = _config(world, tmp_path / "x", lpips_random=False, lpips_dir=str(tmp_path))
        assert lpips_encoder(teacher, config) == name
        # A VAE whose normalisation no E-LatentLPIPS matches is refused, naming the flag...
        teacher.vae_config = {**teacher.vae_config, "scaling_factor": 1.0}
        with pytest.raises(ValueError, match="--lpips-encoder.*matches no E-LatentLPIPS"):
            lpips_encoder(teacher, config)
        # ...unless the loss does not need the name's weights, or the user names one.
        assert lpips_encoder(teacher, dataclasses.replace(config, lpips_random=True,
                                                          lpips_dir=None)) == name
        assert lpips_encoder(teacher, dataclasses.replace(config, lpips_encoder="sd3")) == "sd3"


# ------------------------------------------------------------------------------ resume
def test_resume_after_sigkill_while_writing_a_checkpoint_is_exact(flux_world, tmp_path):
    assert_resume_after_sigkill_while_writing_is_exact(
        lambda name: _config(flux_world, tmp_path / name, max_steps=6), _distill_cmd, _env)


# ------------------------------------------------------------------------------ processes
def test_two_processes_match_one_at_the_same_global_batch(sd3_world, tmp_path):
    """1 process x 2 micro-batches == 2 processes x 1 (gloo), replicated; with
    D2G_TEST_FLOW_SLOW=1 also FSDP2 (one unit per transformer block), resumed once."""
    one = _config(sd3_world, tmp_path / "one", max_steps=4, batch_size=2, grad_accum=2)
    proc = subprocess.run(_distill_cmd(one), env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = _config(sd3_world, tmp_path / "two", max_steps=4, batch_size=2)
    _torchrun(two, 29537)
    _assert_same_metrics(_rows(one.out), _rows(two.out), rel=1e-4)
    apart, moved = weights_apart(sd3_world[0], one.out, two.out)
    assert moved > 0 and apart < 0.01 * moved, (apart, moved)
    if not SLOW:
        return
    sharded = _config(sd3_world, tmp_path / "fsdp", max_steps=2, batch_size=2, fsdp=True)
    _torchrun(sharded, 29538)
    _torchrun(dataclasses.replace(sharded, max_steps=4), 29539)   # resumes from step 2
    _assert_same_metrics(_rows(one.out), _rows(sharded.out), rel=1e-4)
    apart, moved = weights_apart(sd3_world[0], one.out, sharded.out)
    assert moved > 0 and apart < 0.01 * moved, (apart, moved)


def test_fsdp_units_are_the_transformer_blocks(sd3_world, tmp_path):
    """The units FSDP2 shards: one per transformer block of G (the family's blocks) and of D."""
    from d2g_fast.teacher import load_teacher
    from d2g_fast.train.build import make_discriminator, make_generator
    from d2g_fast.train.distributed import _discriminator_units

    teacher = load_teacher(sd3_world[0], resolution=16)
    config = _config(sd3_world, tmp_path / "x")
    g = make_generator(teacher, config)
    assert teacher.blocks(g.net) == list(g.net.transformer_blocks)
    d = make_discriminator(teacher, config)
    assert _discriminator_units(d) == list(d.transformer.transformer_blocks)


# ------------------------------------------------------------------------------ bad input
def test_bad_input_is_refused_before_training(sd3_world, flux_world, tmp_path, capsys):
    out = tmp_path / "bad"
    for config, flag, words in (
            (_config(sd3_world, out, d_taps=[0, 7]), "--d-taps", "blocks"),   # 2 blocks
            (_config(sd3_world, out, d_multiscale_input_off=True), "--d-multiscale-input-off",
             "SD3Discriminator"),
            (_config(flux_world, out, d_multiscale_output_off=True),
             "--d-multiscale-output-off", "FluxDiscriminator"),
            (_config(sd3_world, out, pairs=flux_world[1]), "--pairs", "flux"),  # FLUX store
            (_config(sd3_world, out, timestep=500), "--timestep", "sigma")):
        rc, err = _distill(_cli_args(config), capsys)
        assert rc == 2 and flag in err and words in err, (flag, err[-600:])
    with pytest.raises(SystemExit):   # argparse: not an integer
        d2g_main(["distill", *_cli_args(_config(sd3_world, out)), "--d-taps", "x"])
    assert "--d-taps" in capsys.readouterr().err
    assert not os.path.exists(out / "metrics.csv")
    assert not os.path.exists(out / "checkpoints")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
