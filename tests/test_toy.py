"""The embedded toy world (d2g_fast.toy): data, tokenizer, the shipped weights, evaluate()."""
import json
import os

import pytest
import torch

from d2g_helpers import one_thread

pytest.importorskip("diffusers")

from d2g_fast import toy  # noqa: E402
from d2g_fast.toy import data, models  # noqa: E402


# ----------------------------------------------------------------------------- data
def test_data_is_deterministic_by_seed():
    a = data.sample(16, seed=3)
    b = data.sample(16, seed=3)
    c = data.sample(16, seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (16, 3, 32, 32) and a[0].min() >= -1 and a[0].max() <= 1


def test_captions_name_every_attribute_and_parse_back():
    caps = data.all_captions()
    assert len(caps) == len(set(caps)) == 3 * 3 * 4 * 2
    for labels in data.all_labels()[::7]:
        text = data.caption(labels)
        assert torch.equal(data.parse_caption(text), labels)
        for name, values in data.ATTRIBUTES.items():
            assert values[labels[list(data.ATTRIBUTES).index(name)]] in text
    with pytest.raises(ValueError, match="prompt"):
        data.parse_caption("a purple hexagon")


def test_drawn_pixels_follow_the_caption():
    """Colour at the shape's nominal centre and background in the far corner match the labels."""
    labels = data.all_labels()
    images = (data.draw(labels, torch.Generator().manual_seed(0)) + 1) / 2
    size = data.RESOLUTION
    for img, lab in zip(images, labels):
        cx, cy = data.POSITIONS[data.ATTRIBUTES["position"][lab[2]]]
        centre = img[:, int(cy * size), int(cx * size)]
        assert centre.argmax() == lab[1], (data.caption(lab), centre)
        # The corner diagonally opposite the shape is background.
        corner = img[:, size - 1 if cy < 0.5 else 0, size - 1 if cx < 0.5 else 0]
        expected = data.BACKGROUNDS[data.ATTRIBUTES["background"][lab[3]]]
        assert torch.allclose(corner, torch.full((3,), expected), atol=0.06)


def test_tokenizer_has_one_token_per_caption_word(tmp_path):
    tok = models.build_tokenizer(str(tmp_path))
    for word in models.caption_words():
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    ids = tok(data.all_captions()[0], padding="max_length", max_length=models.MAX_TOKENS).input_ids
    assert len(ids) == models.MAX_TOKENS
    # Text outside the world still tokenizes (byte-level fallback).
    assert len(tok("zebra", add_special_tokens=False).input_ids) >= 1


def test_heldout_is_balanced_and_deterministic():
    prompts, noise = toy.heldout(144)
    assert len(prompts) == 144 and noise.shape == (144, 4, 8, 8)
    assert sorted(set(prompts)) == sorted(toy.train_prompts())
    assert torch.equal(noise, toy.heldout(144)[1])
    assert not torch.equal(noise, toy.heldout(144, seed=1)[1])


# ----------------------------------------------------------------------------- shipped weights
@pytest.fixture(scope="module")
def shipped():
    folder = toy.shipped_dir()
    if not (folder / "provenance.json").is_file():
        pytest.fail(f"the shipped toy world is missing: {folder}")
    return folder


def test_shipped_size_budget_and_provenance(shipped):
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(shipped) for f in fs)
    assert total <= 20 * 2**20, total
    prov = json.loads((shipped / "provenance.json").read_text())
    for key in ("command", "seed", "settings", "data", "software", "metrics", "runtime_total_s"):
        assert key in prov
    assert prov["command"].startswith("d2g toy train")
    # What the demo stands on, as measured when the weights were made: the teacher follows
    # every attribute of its prompts (issue 25: >= 90 % each; chance is 1/3, 1/3, 1/4, 1/2) and
    # its own one-step sampling is far worse than its 25 steps.
    m = prov["metrics"]
    per_attribute = {a: m[f"teacher_25step_{a}_accuracy"] for a in data.ATTRIBUTES}
    assert all(acc >= 0.9 for acc in per_attribute.values()), per_attribute
    assert m["teacher_25step_accuracy"] > 0.1
    assert m["teacher_1step_fd"] > 3 * m["teacher_25step_fd"]
    assert m["classifier_accuracy"] > 0.95 and m["two_afc_val"] > 0.75


def test_shipped_teacher_loads_offline_and_draws_images(shipped):
    from diffusers import StableDiffusionPipeline

    with one_thread():
        pipe = StableDiffusionPipeline.from_pretrained(str(shipped / "teacher"),
                                                       local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        assert pipe.vae.config.scaling_factor != 0.18215  # set from the toy latents' std
        out = pipe(prompt=toy.train_prompts()[:2], num_inference_steps=3, guidance_scale=4.0,
                   output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (2, 3, 32, 32)
    assert torch.isfinite(out).all() and out.std() > 0.05


def test_shipped_classifier_is_accurate_on_fresh_real_images(shipped):
    clf = toy.load_classifier()
    images, labels, _ = data.sample(256, seed=777)
    with one_thread():
        pred = clf.predict(images)
    assert (pred == labels).all(1).float().mean() > 0.95


def test_shipped_elatentlpips_orders_distortions(shipped):
    """Closer latents get smaller distances: a small vs a large perturbation of the same latents,
    and the same caption redrawn vs another caption."""
    from d2g_fast.toy.train import encode

    lp = toy.load_elatentlpips()
    pipe = toy.load_teacher()
    images, labels, _ = data.sample(32, seed=5)
    with one_thread():
        z = encode(pipe.vae, images)
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))

        def dist(a, b):
            return lp(a, b, ensembling=False, add_l1_loss=False).flatten()

        small, large = dist(z, z + 0.1 * noise), dist(z, z + 0.5 * noise)
        same = encode(pipe.vae, data.draw(labels, torch.Generator().manual_seed(9)))
        other = encode(pipe.vae, data.draw(labels.roll(1, 0), torch.Generator().manual_seed(9)))
        d_same, d_other = dist(z, same), dist(z, other)
    assert (small >= 0).all() and (small < large).float().mean() > 0.9
    assert d_same.mean() < d_other.mean()


# ----------------------------------------------------------------------------- evaluate()
def test_evaluate_writes_metrics_grids_chart_and_report(shipped, tmp_path):
    from d2g_fast.toy.evaluate import pipeline_latents

    n = 8
    prompts, noise = toy.heldout(n)
    with one_thread():
        pipe = toy.load_teacher()
        replay = pipeline_latents(pipe, prompts, noise, 2, 4.0)

        def teacher_replay(z, p):  # a "student" that returns the multi-step teacher's latents
            assert p == prompts and torch.equal(z, noise)
            return replay

        metrics = toy.evaluate({"student_1step": lambda z, p: 0.3 * z,
                                "replay": teacher_replay},
                               out=tmp_path, n=n, teacher_steps=2, few_steps=(1,), grid=8,
                               progress=False)
    expected = {"teacher_multistep", "teacher_1step", "student_1step", "replay"}
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == set(on_disk) == expected
    for m in on_disk.values():
        assert {"fd", "accuracy", "images_per_s", "e_latentlpips", "nfe"} <= set(m)
        assert 0.0 <= m["accuracy"] <= 1.0 and m["images_per_s"] > 0
    assert metrics["teacher_multistep"]["e_latentlpips"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["replay"]["e_latentlpips"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["replay"]["fd"] == pytest.approx(metrics["teacher_multistep"]["fd"], rel=1e-6)
    assert metrics["student_1step"]["e_latentlpips"] > 0.0
    for name in list(expected) + ["real"]:
        assert (tmp_path / f"grid_{name}.png").stat().st_size > 0
    assert (tmp_path / "fd_vs_nfe.png").stat().st_size > 0
    report = (tmp_path / "report.md").read_text()
    assert "toy" in report and "student_1step" in report and "Stable Diffusion" in report
    # Diversity (None: n = 8 holds no caption twice) and precision / recall in the report.
    for m in on_disk.values():
        assert 0.0 <= m["precision"] <= 1.0 and 0.0 <= m["recall"] <= 1.0
        assert m["diversity_features"] is None and m["real_floor_precision"] is not None
    assert metrics["replay"]["precision"] == metrics["teacher_multistep"]["precision"]
    assert "| sampler | diversity | diversity (E-LatentLPIPS) | precision | recall |" in report
    assert "| real images |" in report and "Kynkäänniemi" in report


def test_evaluate_rejects_a_bad_student(shipped, tmp_path):
    with pytest.raises(ValueError, match="student_1step"):
        toy.evaluate({"student_1step": 42}, out=tmp_path, n=2, progress=False)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        toy.evaluate({"student_1step": str(tmp_path)}, out=tmp_path, n=2, progress=False)
    assert not (tmp_path / "metrics.json").exists()


# ----------------------------------------------------------------------------- d2g toy train
def test_toy_train_quick_makes_a_loadable_world(tmp_path):
    """The whole command end to end at a few steps per stage (the plumbing, not quality)."""
    from d2g_fast.cli import main

    out = tmp_path / "world"
    with one_thread():
        assert main(["toy", "train", "--out", str(out), "--quick", "--no-progress",
                     "--unet-steps", "5"]) == 0
        prov = json.loads((out / "provenance.json").read_text())
        assert prov["seed"] == 0 and prov["settings"]["unet_steps"] == 5
        pipe = toy.load_teacher(out)
        lp = toy.load_elatentlpips(out)
        z = torch.randn(2, 4, 8, 8)
        assert lp(z, z + 1).flatten().gt(0).all()
    assert pipe.unet.config.sample_size == 8
    assert toy.load_classifier(out).FEATURE_DIM == models.AttributeClassifier.FEATURE_DIM


def test_toy_train_rejects_bad_flags(capsys):
    from d2g_fast.cli import main

    with pytest.raises(SystemExit):
        main(["toy", "train", "--out", "x", "--seed", "-1"])
    assert "--seed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["toy", "train", "--out", "x", "--unet-steps", "0"])
    assert "--unet-steps" in capsys.readouterr().err


def test_vae_stage_is_deterministic():
    from d2g_fast.toy.train import ToySettings, train_vae

    s = ToySettings(vae_steps=2, vae_batch=4, scaling_images=16)
    with one_thread():
        a, _ = train_vae(s, seed=1, progress=False)
        b, _ = train_vae(s, seed=1, progress=False)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("D2G_TOY_REPRODUCE") != "1",
                    reason="the full toy training (~21 min on a busy 2-core CPU); "
                           "set D2G_TOY_REPRODUCE=1 to run it")
def test_toy_train_reproduces_the_shipped_metrics(shipped, tmp_path):
    """``d2g toy train --seed 0`` remade from scratch matches the shipped metrics: teacher
    accuracy within 5 points, FDs within 25 % (float summation order differs between machines
    and thread counts, so the weights are not bit-identical)."""
    from d2g_fast.toy.train import train_all

    torch.set_num_threads(1)
    ref = json.loads((shipped / "provenance.json").read_text())["metrics"]
    new = train_all(tmp_path, seed=0, progress=False)["metrics"]
    assert abs(new["teacher_25step_accuracy"] - ref["teacher_25step_accuracy"]) <= 0.05
    assert new["teacher_25step_position_accuracy"] >= 0.9
    for key in ("teacher_25step_fd", "teacher_1step_fd"):
        assert new[key] == pytest.approx(ref[key], rel=0.25), key
    assert new["classifier_accuracy"] > 0.95
