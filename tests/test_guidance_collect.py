"""Collection over several guidance scales (issue 21, part 1): pair i's scale is a pure function
of (seed, i), stored per pair in the shards and every PairDataset item; resume and verify stay
exact; one scale behaves as before."""
import json
import os

import pytest
import torch
from d2g_helpers import one_thread

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import DDIMScheduler, StableDiffusionPipeline  # noqa: E402
from test_collect import _assert_same_store  # noqa: E402

from d2g_fast.cli import main as d2g_main  # noqa: E402
from d2g_fast.data import PairDataset, load_prompts  # noqa: E402
from d2g_fast.data.seeding import GuidanceSchedule, derive_seed, guidance_set  # noqa: E402
from d2g_fast.teacher import Teacher, collect  # noqa: E402
from d2g_fast.testing import save_tiny_sd_pipeline  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return save_tiny_sd_pipeline(str(tmp_path_factory.mktemp("guidance_teacher") / "tiny_sd"))


def _quiet():
    return dict(progress=False, log=lambda *_: None)


def _independent_guidance(spec, seed, i):
    """The documented rule (GUIDANCE_RULE), written out again without GuidanceSchedule."""
    gen = torch.Generator().manual_seed(derive_seed(seed, i, "guidance"))
    if "values" in spec:
        v = spec["values"][int(torch.randint(len(spec["values"]), (1,), generator=gen))]
    else:
        lo, hi = spec["range"]
        v = lo + (hi - lo) * float(torch.rand(1, generator=gen, dtype=torch.float64))
    return float(torch.tensor(v, dtype=torch.float32))


def test_guidance_schedule_is_a_pure_function_of_seed_and_index():
    spec = guidance_set([8, 2, 4.5])
    assert spec == {"values": [2.0, 4.5, 8.0]}
    sched = GuidanceSchedule(spec, 3)
    drawn = [sched(i) for i in range(200)]
    assert set(drawn) == {2.0, 4.5, 8.0}
    assert drawn == [GuidanceSchedule(spec, 3)(i) for i in reversed(range(200))][::-1]
    assert drawn != [GuidanceSchedule(spec, 4)(i) for i in range(200)]
    rng = guidance_set(None, (1.5, 9))
    values = GuidanceSchedule(rng, 0).values(range(500))
    assert values.dtype == torch.float32 and 1.5 <= values.min() and values.max() <= 9
    assert len(set(values.tolist())) == 500 and 4.5 < float(values.mean()) < 6.0
    assert values.tolist() == [_independent_guidance(rng, 0, i) for i in range(500)]
    # One scale (also a repeated one) is the fixed-guidance collection of before.
    assert guidance_set(7.5) is None and guidance_set([3, 3.0]) is None
    for bad, flag in (([], "--guidance"), ([2, -1], "--guidance")):
        with pytest.raises(ValueError, match=flag):
            guidance_set(bad)
    for bad in ((9, 1.5), (2, 2), (-1, 3), (float("nan"), 2)):
        with pytest.raises(ValueError, match="--guidance-range"):
            guidance_set(None, bad)


def test_multi_guidance_store_records_each_pairs_guidance(sd_folder, tmp_path):
    teacher = Teacher.from_pretrained(sd_folder)
    prompts = load_prompts(None)
    out = str(tmp_path / "pairs")
    manifest = collect(teacher, prompts, out, 7, steps=3, guidance=[1.0, 3.0, 7.5], batch_size=4,
                       shard_size=5, seed=2, **_quiet())
    config = manifest["config"]
    assert config["guidance"] is None and config["guidance_set"] == {"values": [1.0, 3.0, 7.5]}
    assert "guidance_rule" in config and manifest["tensors"]["guidance"]["dtype"] == "float32"
    ds = PairDataset(out, check="sha256")
    assert ds.guidance_set == {"values": [1.0, 3.0, 7.5]}
    items = [ds[i] for i in range(7)]
    stored = [float(it["guidance"]) for it in items]
    assert all(it["guidance"].dtype == torch.float32 and it["guidance"].ndim == 0 for it in items)
    assert stored == [_independent_guidance(config["guidance_set"], 2, i) for i in range(7)]
    assert len(set(stored)) > 1, "the test needs pairs at different scales"
    # Each latent is the stock pipeline's at the pair's own scale (run one pair at a time).
    pipe = StableDiffusionPipeline.from_pretrained(sd_folder, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for it in items:
        ref = pipe([it["prompt"]], latents=it["noise"][None].clone(), num_inference_steps=3,
                   guidance_scale=float(it["guidance"]), output_type="latent").images[0]
        err = float((ref - it["latent"]).abs().max())
        assert err <= 1e-4 * max(1.0, float(ref.abs().max())), (it["index"], err)
    # A training batch carries the scales as float32 [B].
    batch = torch.utils.data.default_collate(items[:3])
    assert batch["guidance"].dtype == torch.float32 and batch["guidance"].tolist() == stored[:3]


def test_multi_guidance_resume_and_verify_are_exact(sd_folder, tmp_path, capsys):
    args = ["--teacher", sd_folder, "--num-pairs", "6", "--shard-size", "2", "--batch-size", "2",
            "--steps", "2", "--guidance-range", "1.5", "9", "--seed", "4", "--no-progress"]
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    assert d2g_main(["collect", *args, "--out", full]) == 0
    assert d2g_main(["collect", *args, "--out", resumed]) == 0
    # As a killed run leaves it: one shard (and its receipt) missing; the rerun makes it again.
    for name in ("shard-00001.safetensors", "shard-00001.json"):
        os.remove(os.path.join(resumed, name))
    capsys.readouterr()
    assert d2g_main(["collect", *args, "--out", resumed]) == 0
    assert "2 done, 1 to make" in capsys.readouterr().out
    _assert_same_store(full, resumed)
    manifest = json.load(open(os.path.join(full, "manifest.json")))
    assert manifest["config"]["guidance_set"] == {"range": [1.5, 9.0]}
    assert d2g_main(["verify", full, "--recompute", "6"]) == 0
    report = capsys.readouterr().out
    assert report.count("guidance ok") == 6 and "intact" in report, report
    # Another guidance set is another configuration: refused, the folder untouched.
    before = open(os.path.join(full, "manifest.json"), "rb").read()
    bad = [a if a != "9" else "8" for a in args]
    assert d2g_main(["collect", *bad, "--out", full]) == 2
    assert "guidance_set" in capsys.readouterr().err
    assert open(os.path.join(full, "manifest.json"), "rb").read() == before


def test_a_stored_guidance_that_differs_from_the_rule_fails_verify(sd_folder, tmp_path, capsys):
    from safetensors.torch import load_file, save

    from d2g_fast.data import store

    out = str(tmp_path / "pairs")
    assert d2g_main(["collect", "--teacher", sd_folder, "--num-pairs", "2", "--shard-size", "2",
                     "--steps", "2", "--guidance", "2,8", "--no-progress", "--out", out]) == 0
    shard = os.path.join(out, "shard-00000.safetensors")
    tensors = load_file(shard)
    tensors["guidance"][1] = 5.0
    data = save(tensors)
    store.atomic_write_bytes(shard, data)
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    manifest["shards"][0].update(bytes=len(data), sha256=store.sha256_bytes(data))
    store.atomic_write_json(os.path.join(out, "manifest.json"), manifest)
    capsys.readouterr()
    assert d2g_main(["verify", out, "--recompute", "2"]) == 1
    report = capsys.readouterr().out
    assert "FAIL pair 1" in report and "guidance DIFFERS" in report, report


def test_single_guidance_is_as_before_and_old_stores_load(sd_folder, tmp_path):
    from safetensors.torch import load_file, save

    from d2g_fast.data import store

    teacher = Teacher.from_pretrained(sd_folder)
    out = str(tmp_path / "pairs")
    manifest = collect(teacher, ["a cat", "a dog"], out, 3, steps=2, guidance=[4.0], **_quiet())
    config = manifest["config"]
    assert config["guidance"] == 4.0 and "guidance_set" not in config
    assert "guidance_rule" not in config  # the configuration (and its hash) of before
    ds = PairDataset(out)
    assert ds.guidance_set is None and [float(ds[i]["guidance"]) for i in range(3)] == [4.0] * 3
    # A store written before per-pair guidance has no "guidance" tensor: its scale is the
    # collection's.
    shard = os.path.join(out, "shard-00000.safetensors")
    tensors = load_file(shard)
    del tensors["guidance"]
    data = save(tensors)
    store.atomic_write_bytes(shard, data)
    manifest["shards"][0].update(bytes=len(data), sha256=store.sha256_bytes(data))
    store.atomic_write_json(os.path.join(out, "manifest.json"), manifest)
    old = PairDataset(out, check="sha256")
    assert old[2]["guidance"].dtype == torch.float32 and float(old[2]["guidance"]) == 4.0


def test_guidance_flags_bad_input(sd_folder, tmp_path, capsys):
    base = ["collect", "--teacher", sd_folder, "--num-pairs", "2", "--no-progress"]
    out = str(tmp_path / "a")
    assert d2g_main([*base, "--guidance", "2,4", "--guidance-range", "1", "3",
                     "--out", out]) == 2
    assert "--guidance-range" in capsys.readouterr().err
    assert d2g_main([*base, "--guidance-range", "9", "1", "--out", out]) == 2
    assert "--guidance-range" in capsys.readouterr().err
    assert d2g_main([*base, "--guidance", "2,-3", "--out", out]) == 2
    assert "--guidance" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        d2g_main([*base, "--guidance", "2,x", "--out", out])
    assert "--guidance" in capsys.readouterr().err
    assert not os.path.exists(out), "bad input must write nothing"


def test_distill_reads_the_guidance_set_of_a_multi_guidance_store():
    from d2g_fast.train.build import collection_guidance, collection_guidance_set

    class Store:
        manifest = {"config": {"guidance": None, "guidance_set": {"values": [2.0, 8.0]}}}

    assert collection_guidance(Store()) is None
    assert collection_guidance_set(Store()) == {"values": [2.0, 8.0]}
    Store.manifest = {"config": {"guidance": 7.5}}
    assert collection_guidance(Store()) == 7.5 and collection_guidance_set(Store()) is None


@pytest.mark.slow
def test_multi_guidance_torchrun_two_processes_equals_one(sd_folder, tmp_path):
    import subprocess
    import sys

    from test_collect import REPO, _env

    args = ["--teacher", sd_folder, "--num-pairs", "5", "--shard-size", "2", "--batch-size", "2",
            "--steps", "2", "--seed", "6", "--guidance", "2,4.5,8", "--no-progress"]
    two = str(tmp_path / "two")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "d2g_fast.cli", "collect", *args, "--out", two]
    run = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    ranks = {json.load(open(os.path.join(two, f"shard-{k:05d}.json")))["rank"] for k in range(3)}
    assert ranks == {0, 1}, f"shards were not split between the ranks: {ranks}"
    one = str(tmp_path / "one")
    assert d2g_main(["collect", *args, "--out", one]) == 0
    _assert_same_store(two, one)
    assert len({float(PairDataset(two)[i]["guidance"]) for i in range(5)}) > 1
