"""d2g eval / d2g compare end to end on tiny stand-ins: a tiny SD pipeline, a tiny TorchScript
network in clean-fid's Inception format, a tiny CLIP folder, captions and reference images."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from d2g_helpers import one_thread
from eval_fixtures import (save_tiny_clip, save_tiny_dinov2, save_tiny_inception, write_captions,
                           write_reference_images)

from d2g_fast.cli import main
from d2g_fast.eval.protocol import Protocol
from d2g_fast.testing.tiny import save_tiny_sd_pipeline

NUM = 24
DIV_PROMPTS = 4  # x 2 seeds: one extra shard of 8 images
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval_fx")
    with one_thread():
        paths = dict(pipe=save_tiny_sd_pipeline(str(d / "pipe")),
                     inception=save_tiny_inception(str(d / "inception.pt")),
                     clip=save_tiny_clip(str(d / "clip")),
                     dinov2=save_tiny_dinov2(str(d / "dinov2")),
                     captions=write_captions(str(d / "captions.txt"), NUM),
                     reference=write_reference_images(str(d / "reference"), 20))
    return paths


def _args(fx, out, **over):
    flags = {"--model": fx["pipe"], "--captions": fx["captions"], "--reference": fx["reference"],
             "--out": str(out), "--inception-weights": fx["inception"], "--clip": fx["clip"],
             "--num-images": str(NUM), "--resolution": "16", "--steps": "2", "--guidance": "7.5",
             "--batch-size": "4", "--shard-size": "8", "--diversity-prompts": str(DIV_PROMPTS),
             "--diversity-seeds": "2"}
    flags.update(over)
    return ["eval"] + [x for k, v in flags.items() if v is not None for x in (k, v)]


def _eval(fx, out, **over):
    with one_thread():
        assert main(_args(fx, out, **over)) == 0
    with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
        return json.load(f)


def _subprocess(argv, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


@pytest.fixture(scope="module")
def first(fx, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_first")
    return out, _eval(fx, out)


def test_report_lists_every_protocol_choice(first):
    out, report = first
    protocol = report["protocol"]
    assert set(protocol) == {f.name for f in Protocol.__dataclass_fields__.values()}
    assert all(v not in ("", None) for k, v in protocol.items() if k != "extra_features_sha256")
    assert protocol["name"] == "custom"  # --num/--resolution changed coco30k-gigagan's choices
    assert protocol["resize_filter"] == "lanczos" and protocol["crop"] == "center"
    assert protocol["clip_prefix"] == "A photo depicts "
    assert protocol["fid_library"].startswith("clean-fid ")
    md = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    for key, value in protocol.items():
        assert f"| {key} |" in md
    m = report["metrics"]
    assert m["num_images"] == NUM and np.isfinite(m["fid"]) and m["fid"] > 0
    assert -1 <= m["clip_score"] <= 1
    assert report["run"]["shards"] == 3 and report["run"]["shards_made"] == 3
    assert report["run"]["diversity_shards"] == 1
    assert (protocol["pr_k"], protocol["diversity_prompts"], protocol["diversity_seeds"]) == \
        (3, DIV_PROMPTS, 2)
    for title in ("| precision |", "| recall |", "| diversity |", "Kynkäänniemi"):
        assert title in md


def test_precision_recall_and_diversity_match_the_shards(first):
    """The report's precision / recall and diversity recomputed by hand from what the run
    stored: the reference features, the generated features, the diversity set's features."""
    from d2g_fast.data.store import plan_shards, read_json
    from d2g_fast.eval import generate as gen
    from d2g_fast.eval import load_statistics, per_prompt_diversity, precision_recall

    out, report = first
    m = report["metrics"]
    ref = load_statistics(str(out / "reference-stats.npz"))
    assert ref["features"].dtype == np.float32 and ref["features"].shape == (20, 12)
    config_hash = read_json(str(out / "eval-config.json"))["config_hash"]
    fake = gen.read_shards(str(out), plan_shards(NUM, 8), config_hash)["inception"]
    pr = precision_recall(ref["features"], fake, 3)
    assert (m["precision"], m["recall"]) == (pr["precision"], pr["recall"])
    assert (m["pr_num_real"], m["pr_num_fake"]) == (20, NUM)
    assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
    div_dir = out / "diversity"
    div_hash = read_json(str(div_dir / "eval-config.json"))["config_hash"]
    div = gen.read_shards(str(div_dir), plan_shards(2 * DIV_PROMPTS, 8), div_hash)
    np.testing.assert_array_equal(div["index"], np.arange(2 * DIV_PROMPTS))
    by_caption = per_prompt_diversity(div["inception"], [i // 2 for i in range(2 * DIV_PROMPTS)])
    assert m["diversity"] == by_caption["mean"] > 0 and m["diversity_pairs"] == DIV_PROMPTS
    # The diversity images are other noises than the main set's images of the same captions.
    assert not np.array_equal(div["inception"][0], fake[0])


def test_deterministic_and_reference_stats_reusable(fx, first, tmp_path):
    out, report = first
    again = _eval(fx, tmp_path / "again",
                  **{"--reference": os.path.join(out, "reference-stats.npz")})
    assert again["metrics"] == report["metrics"]
    assert again["protocol"] == report["protocol"]  # folder and its saved statistics: one reference
    assert again["reference"]["num_images"] == report["reference"]["num_images"] == 20
    # The same images are generated again, bit for bit.
    from safetensors.numpy import load_file
    a = load_file(os.path.join(out, "shards", "shard-00001.safetensors"))
    b = load_file(os.path.join(tmp_path / "again", "shards", "shard-00001.safetensors"))
    assert a["images"].dtype == np.uint8 and a["images"].shape == (8, 16, 16, 3)
    np.testing.assert_array_equal(a["images"], b["images"])
    # A different seed gives other images and another FID.
    other = _eval(fx, tmp_path / "seed", **{"--seed": "1"})
    assert other["metrics"]["fid"] != report["metrics"]["fid"]


def test_killed_run_resumes_without_recomputing(fx, first, tmp_path):
    out_ref, report = first
    out = tmp_path / "killed"
    # Kill the process with SIGKILL right after its second shard is written.
    script = (
        "import os, signal, sys\n"
        "import d2g_fast.eval.generate as g\n"
        "from d2g_fast.cli import main\n"
        "orig, done = g.write_shard, []\n"
        "def write_then_die(*a, **k):\n"
        "    orig(*a, **k); done.append(1)\n"
        "    if len(done) == 2: os.kill(os.getpid(), signal.SIGKILL)\n"
        "g.write_shard = write_then_die\n"
        "sys.exit(main(sys.argv[1:]))\n")
    proc = _subprocess([sys.executable, "-c", script] + _args(fx, out))
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, log
    shards = out / "shards"
    done = sorted(p.name for p in shards.glob("shard-*.json"))
    assert done == ["shard-00000.json", "shard-00001.json"]
    stamps = {n: os.stat(shards / n).st_mtime_ns for n in os.listdir(shards)}
    resumed = _eval(fx, out)
    assert resumed["run"]["shards_reused"] == 2 and resumed["run"]["shards_made"] == 1
    for name, stamp in stamps.items():  # finished shards were not rewritten
        assert os.stat(shards / name).st_mtime_ns == stamp
    assert resumed["metrics"] == report["metrics"]


def test_torchrun_two_processes_give_the_same_numbers(fx, first, tmp_path):
    out_ref, report = first
    out = tmp_path / "torchrun"
    proc = _subprocess([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-port", str(29500 + os.getpid() % 1000), "-m", "d2g_fast.cli"]
                       + _args(fx, out))
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    with open(out / "report.json", encoding="utf-8") as f:
        dist = json.load(f)
    assert dist["run"]["world_size"] == 2 and dist["run"]["shards_made"] == 3
    assert dist["metrics"] == report["metrics"]


def test_compare_side_by_side_and_refuses_mismatched_protocols(fx, first, tmp_path, capsys):
    out, _ = first
    one_step = tmp_path / "one-step"
    _eval(fx, one_step, **{"--steps": "1", "--guidance": "0", "--label": "student"})
    capsys.readouterr()
    table = tmp_path / "table.md"
    assert main(["compare", str(out), str(one_step / "report.json"), "--out", str(table)]) == 0
    text = capsys.readouterr().out
    assert "| student | 1 | 0.0000 |" in text and "| pipe | 2 | 7.5000 |" in text
    assert "| precision | recall | diversity |" in text
    assert table.read_text() == text
    other = tmp_path / "other-protocol"
    _eval(fx, other, **{"--num-images": str(NUM - 4)})
    assert main(["compare", str(out), str(other)]) == 2
    err = capsys.readouterr().err
    assert "REPORT" in err and str(other) in err and "num_images" in err
    assert "captions_sha256" in err


@pytest.mark.parametrize("flag,value,needle", [
    ("--inception-weights", "missing.pt", "--inception-weights"),
    ("--captions", "missing.txt", "--captions"),
    ("--reference", "missing.npz", "--reference"),
    ("--clip", "missing-clip", "--clip"),
    ("--model", "missing-model", "--model"),
    ("--num-images", "1000", "--captions"),
    ("--num-images", "1", "--num-images"),
    ("--steps", "0", "--steps"),
    ("--pr-k", "0", "--pr-k"),
    ("--pr-k", str(NUM), "--pr-k"),
    ("--diversity-prompts", str(NUM + 1), "--diversity-prompts"),
    ("--diversity-seeds", "1", "--diversity-seeds"),
])
def test_bad_input_names_the_argument(fx, tmp_path, capsys, flag, value, needle):
    if "missing" in value:
        value = str(tmp_path / value)
    out = tmp_path / "out"
    with one_thread():
        assert main(_args(fx, out, **{flag: value})) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert not os.path.exists(out / "shards")  # nothing started
    if flag == "--inception-weights":
        assert "inception-2015-12-05.pt" in err and "https://" in err


def test_statistics_without_features_and_no_diversity(fx, first, tmp_path, capsys):
    """clean-fid-style statistics (mu, sigma only): FID as before, no precision / recall; with
    --diversity-prompts 0 no diversity set either. The main shards are reused when only these
    choices change (they are not part of the images' configuration)."""
    from d2g_fast.eval import load_statistics, save_statistics

    out, report = first
    ref = load_statistics(str(out / "reference-stats.npz"))
    stats_only = tmp_path / "stats-only.npz"
    save_statistics(str(stats_only), mu=ref["mu"], sigma=ref["sigma"])
    bare = _eval(fx, tmp_path / "bare", **{"--reference": str(stats_only),
                                            "--diversity-prompts": "0"})
    m = bare["metrics"]
    assert m["fid"] == report["metrics"]["fid"]
    assert m["precision"] is m["recall"] is m["diversity"] is None
    assert bare["protocol"]["reference_features_sha256"] is None
    assert bare["protocol"]["diversity_prompts"] == 0 and bare["run"]["diversity_shards"] == 0
    assert not (tmp_path / "bare" / "diversity").exists()
    assert "precision / recall: not measured" in capsys.readouterr().out
    md = (tmp_path / "bare" / "report.md").read_text(encoding="utf-8")
    assert "| precision | - |" in md and "| diversity | - |" in md
    # Another k on the same folder: the images are reused, only the metrics change.
    again = _eval(fx, tmp_path / "bare", **{"--reference": str(stats_only),
                                             "--diversity-prompts": "0", "--pr-k": "5"})
    assert again["run"]["shards_made"] == 0 and again["protocol"]["pr_k"] == 5
    # compare refuses to set different precision / recall or diversity choices side by side.
    assert main(["compare", str(out), str(tmp_path / "bare")]) == 2
    err = capsys.readouterr().err
    assert "pr_k" in err and "diversity_prompts" in err and "reference_features_sha256" in err


def test_out_with_another_configuration_is_refused(fx, first, capsys):
    out, _ = first
    with one_thread():
        assert main(_args(fx, out, **{"--steps": "3"})) == 2
    assert "--out" in capsys.readouterr().err
    # Another diversity sampling: refused before anything is generated.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with one_thread():
        assert main(_args(fx, out, **{"--diversity-seeds": "3"})) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "diversity" in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps


def _no_network(*args, **kwargs):
    raise AssertionError(f"d2g eval tried to open a network connection: {args}")


def test_second_feature_space_with_network_blocked(fx, first, tmp_path, capsys, monkeypatch):
    import socket

    from d2g_fast.eval import frechet_distance_from_stats, load_statistics

    # Every loader (pipeline, Inception, CLIP, DINOv2) runs with connections refused.
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    monkeypatch.setattr(socket, "create_connection", _no_network)
    out = tmp_path / "extra"
    report = _eval(fx, out, **{"--extra-features": fx["dinov2"]})
    assert report["protocol"]["extra_features_sha256"]
    assert report["metrics"]["fid"] == first[1]["metrics"]["fid"]  # Inception part unchanged
    gen, ref = (load_statistics(str(out / name)) for name in ("stats.npz", "reference-stats.npz"))
    assert gen["extra_mu"].shape == (32,)
    assert report["metrics"]["fd_extra"] == frechet_distance_from_stats(
        gen["extra_mu"], gen["extra_sigma"], ref["extra_mu"], ref["extra_sigma"]) > 0
    # Statistics without the second space cannot serve as its reference.
    with one_thread():
        assert main(_args(fx, tmp_path / "no-extra", **{
            "--extra-features": fx["dinov2"],
            "--reference": os.path.join(first[0], "reference-stats.npz")})) == 2
    assert "--reference" in capsys.readouterr().err
    assert not (tmp_path / "no-extra" / "shards").exists()  # refused before generating


def test_clip_score_plumbing_matches_manual_computation(fx):
    from transformers import CLIPModel, CLIPTokenizer

    from d2g_fast.eval.features import ClipScorer

    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    captions = ["a red cat", "two dogs on a hill", "the sea"]
    with one_thread():
        scores = ClipScorer(fx["clip"], "A photo depicts ")(images, captions)
        # By hand: CLIP's normalisation (32x32 needs no resize or crop) and the tokeniser.
        model = CLIPModel.from_pretrained(fx["clip"]).eval()
        tok = CLIPTokenizer.from_pretrained(fx["clip"])
        mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), \
            torch.tensor([0.26862954, 0.26130258, 0.27577711])
        pixels = ((torch.from_numpy(images).double() / 255 - mean) / std).permute(0, 3, 1, 2)
        with torch.no_grad():
            img = model.get_image_features(pixel_values=pixels.float())
            ids = tok(["A photo depicts " + c for c in captions], padding=True,
                      return_tensors="pt")
            txt = model.get_text_features(**ids)
        img = getattr(img, "pooler_output", img).double()
        txt = getattr(txt, "pooler_output", txt).double()
        expected = torch.nn.functional.cosine_similarity(img, txt).numpy()
        no_prefix = ClipScorer(fx["clip"], "")(images, captions)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(no_prefix, scores)  # the prefix reaches the text encoder
