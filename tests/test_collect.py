"""Pair collection end to end on tiny SD/SDXL teachers: parity with the diffusers pipelines,
kill-and-resume, torchrun, verify, and bad input."""
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
from d2g_helpers import one_thread

pytest.importorskip("diffusers")  # the GPU machine may lack it
pytest.importorskip("transformers")

from diffusers import (DDIMScheduler, StableDiffusionPipeline,  # noqa: E402
                       StableDiffusionXLPipeline)

from d2g_fast.bench.machine import device_name  # noqa: E402
from d2g_fast.cli import main as d2g_main  # noqa: E402
from d2g_fast.data import PairDataset, StoreError, load_prompts  # noqa: E402
from d2g_fast.data.store import ConfigMismatchError  # noqa: E402
from d2g_fast.teacher import NonFiniteLatentError, Teacher, collect  # noqa: E402
from d2g_fast.testing import save_tiny_sd_pipeline, save_tiny_sdxl_pipeline  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _one_thread_collect():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return save_tiny_sd_pipeline(str(tmp_path_factory.mktemp("collect_teacher") / "tiny_sd"))


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return save_tiny_sdxl_pipeline(str(tmp_path_factory.mktemp("collect_teacher") / "tiny_sdxl"))


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    return env


def _store_files(root):
    """Every file of a finished store, with the machine-dependent cost section left out of the
    manifest (it records device-seconds) and the receipts (bookkeeping with timings) skipped."""
    files = {}
    for name in sorted(os.listdir(root)):
        with open(os.path.join(root, name), "rb") as f:
            data = f.read()
        if name == "manifest.json":
            manifest = json.loads(data)
            manifest.pop("cost")
            manifest["prompts"].pop("source")
            data = json.dumps(manifest, sort_keys=True).encode()
        elif name.endswith(".json") and name.startswith("shard-"):
            continue
        files[name] = data
    return files


def _assert_same_store(a, b):
    fa, fb = _store_files(a), _store_files(b)
    assert sorted(fa) == sorted(fb), f"different files: {sorted(fa)} vs {sorted(fb)}"
    differing = [name for name in fa if fa[name] != fb[name]]
    assert not differing, f"files differ byte-wise: {differing}"


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_collect_stored_latent_equals_diffusers_pipeline(kind, sd_folder, sdxl_folder, tmp_path):
    folder = sd_folder if kind == "sd" else sdxl_folder
    teacher = Teacher.from_pretrained(folder)
    prompts = load_prompts(None)
    collect(teacher, prompts, str(tmp_path / "pairs"), 5, steps=4, guidance=7.5, batch_size=2,
            shard_size=3, seed=11, progress=False, log=lambda *_: None)
    ds = PairDataset(str(tmp_path / "pairs"), check="sha256")
    assert len(ds) == 5
    pipe_cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    pipe = pipe_cls.from_pretrained(folder, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    items = [ds[i] for i in range(5)]
    assert [it["index"] for it in items] == list(range(5))
    assert len({it["prompt"] for it in items}) > 1
    # The pipeline runs the collector's batches (shards of 3 in batches of 2: rows 0-1, 2, 3-4)
    # so that batched kernels round alike.
    refs = []
    for rows in ([0, 1], [2], [3, 4]):
        noise = torch.stack([items[r]["noise"] for r in rows])
        refs.append(pipe([items[r]["prompt"] for r in rows], latents=noise.clone(),
                         num_inference_steps=4, guidance_scale=7.5, output_type="latent").images)
    ref = torch.cat(refs)
    stored = torch.stack([it["latent"] for it in items])
    err = (stored - ref).abs().max().item()
    assert ref.abs().max() > 0.1 and err <= 1e-5, f"{kind}: max |stored - pipeline| = {err:.3g}"


@pytest.mark.slow
def test_collect_kill_and_resume_equals_uninterrupted_run(sd_folder, tmp_path, capsys):
    args = ["--teacher", sd_folder, "--num-pairs", "16", "--shard-size", "2",
            "--batch-size", "1", "--steps", "10", "--guidance", "5", "--seed", "3",
            "--no-progress"]
    killed = str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "d2g_fast.cli", "collect", *args, "--out", killed]
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while not os.path.exists(os.path.join(killed, "shard-00001.json")):
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.time() < deadline, "the collector wrote no shard in time"
        time.sleep(0.01)
    time.sleep(0.05)  # land somewhere inside a later shard
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    manifest = json.load(open(os.path.join(killed, "manifest.json")))
    assert not manifest["complete"], "the run finished before it was killed: test is void"
    done_before = len([n for n in os.listdir(killed)
                       if n.startswith("shard-") and n.endswith(".json")])  # receipts
    # A temporary file as a killed writer may leave one: the rerun must remove it.
    with open(os.path.join(killed, "shard-00007.safetensors.tmp-abc"), "wb") as f:
        f.write(b"partial")
    rerun = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{done_before} done" in rerun.stdout, rerun.stdout

    full = str(tmp_path / "uninterrupted")
    assert d2g_main(["collect", *args, "--out", full]) == 0
    _assert_same_store(killed, full)
    assert not any(".tmp-" in n for n in os.listdir(killed))
    # Rerunning a finished collection redoes nothing and changes nothing.
    capsys.readouterr()
    assert d2g_main(["collect", *args, "--out", full]) == 0
    assert "8 shards, 8 done, 0 to make" in capsys.readouterr().out
    _assert_same_store(killed, full)


@pytest.mark.slow
def test_collect_torchrun_two_processes_equals_one(sd_folder, tmp_path):
    args = ["--teacher", sd_folder, "--num-pairs", "9", "--shard-size", "2", "--batch-size", "2",
            "--steps", "3", "--seed", "5", "--store-embeddings", "--no-progress"]
    two = str(tmp_path / "two")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "d2g_fast.cli", "collect", *args, "--out", two]
    run = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    ranks = {json.load(open(os.path.join(two, f"shard-{k:05d}.json")))["rank"] for k in range(5)}
    assert ranks == {0, 1}, f"shards were not split between the ranks: {ranks}"
    one = str(tmp_path / "one")
    assert d2g_main(["collect", *args, "--out", one]) == 0
    _assert_same_store(two, one)
    ds = PairDataset(two)
    assert ds.has_embeddings and ds[8]["prompt_embeds"].shape == (77, 32)


def test_collect_verify_names_flipped_shard(sd_folder, tmp_path, capsys):
    out = str(tmp_path / "pairs")
    assert d2g_main(["collect", "--teacher", sd_folder, "--num-pairs", "6", "--shard-size", "2",
                     "--batch-size", "2", "--steps", "3", "--no-progress", "--out", out]) == 0
    # The receipts name the CPU as every record does (d2g_fast.bench.machine, the one source).
    devices = json.load(open(os.path.join(out, "manifest.json")))["cost"]["devices"]
    assert devices == [device_name("cpu")] and "cores, 1 torch threads)" in devices[0], devices
    assert d2g_main(["verify", out, "--recompute", "3"]) == 0
    assert "intact" in capsys.readouterr().out
    shard = os.path.join(out, "shard-00001.safetensors")
    with open(shard, "r+b") as f:
        f.seek(os.path.getsize(shard) - 7)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x10]))
    assert d2g_main(["verify", out]) == 1
    report = capsys.readouterr().out
    assert "shard-00001.safetensors" in report and "sha256" in report, report
    assert "shard-00000" not in report and "shard-00002" not in report, report
    with pytest.raises(StoreError, match="shard-00001.safetensors"):
        PairDataset(out, check="sha256")


def test_collect_verify_recompute_catches_a_wrong_latent(sd_folder, tmp_path, capsys):
    """A shard whose checksum is right but whose latent is not what the teacher gives."""
    from safetensors.torch import load_file, save

    from d2g_fast.data import store

    out = str(tmp_path / "pairs")
    assert d2g_main(["collect", "--teacher", sd_folder, "--num-pairs", "4", "--shard-size", "2",
                     "--batch-size", "2", "--steps", "3", "--no-progress", "--out", out]) == 0
    shard = os.path.join(out, "shard-00001.safetensors")
    tensors = load_file(shard)
    tensors["latent"][1] += 0.5  # pair 3
    data = save(tensors)
    store.atomic_write_bytes(shard, data)
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    manifest["shards"][1].update(bytes=len(data), sha256=store.sha256_bytes(data))
    store.atomic_write_json(os.path.join(out, "manifest.json"), manifest)
    assert d2g_main(["verify", out]) == 0  # checksums alone cannot see it
    capsys.readouterr()
    assert d2g_main(["verify", out, "--recompute", "4"]) == 1
    report = capsys.readouterr().out
    assert "FAIL pair 3" in report and "ok   pair 2" in report, report


def test_collect_stochastic_scheduler_is_reproducible(sd_folder, tmp_path):
    teacher = Teacher.from_pretrained(sd_folder)
    kw = dict(steps=3, guidance=4.0, scheduler="euler_a", batch_size=2, shard_size=2,
              progress=False, log=lambda *_: None)
    with pytest.warns(RuntimeWarning, match="fresh noise"):
        collect(teacher, ["a cat", "a dog"], str(tmp_path / "a"), 4, **kw)
    with pytest.warns(RuntimeWarning, match="fresh noise"):
        collect(teacher, ["a cat", "a dog"], str(tmp_path / "b"), 4, **kw)
    _assert_same_store(str(tmp_path / "a"), str(tmp_path / "b"))


def test_collect_resume_refuses_other_configuration(sd_folder, tmp_path, capsys):
    teacher = Teacher.from_pretrained(sd_folder)
    prompts = load_prompts(None)
    out = str(tmp_path / "pairs")
    kw = dict(steps=3, guidance=4.0, batch_size=2, shard_size=2, progress=False,
              log=lambda *_: None)
    collect(teacher, prompts, out, 5, **kw)  # shards of 2, 2 and 1 pairs
    with pytest.raises(ConfigMismatchError, match=r"--out.*steps: stored 3, requested 4"):
        collect(teacher, prompts, out, 4, **{**kw, "steps": 4})
    with pytest.raises(ConfigMismatchError, match="guidance"):
        collect(teacher, prompts, out, 4, **{**kw, "guidance": 5.0})
    with pytest.raises(ConfigMismatchError, match="prompts_sha256"):
        collect(teacher, prompts[:10], out, 4, **kw)
    # Growing the collection is allowed: full shards are kept as they are, the partial last
    # shard is made again with its new size.
    before = [open(os.path.join(out, f"shard-0000{k}.safetensors"), "rb").read()
              for k in range(3)]
    collect(teacher, prompts, out, 6, **kw)
    after = [open(os.path.join(out, f"shard-0000{k}.safetensors"), "rb").read()
             for k in range(3)]
    assert after[:2] == before[:2] and after[2] != before[2]
    ds = PairDataset(out, check="sha256")
    assert len(ds) == 6 and [ds[i]["index"] for i in range(6)] == list(range(6))
    # Through the command line: one line naming the argument, exit status 2.
    assert d2g_main(["collect", "--teacher", sd_folder, "--num-pairs", "4", "--steps", "9",
                     "--out", out, "--no-progress"]) == 2
    assert "--out" in capsys.readouterr().err


def test_collect_bad_input(sd_folder, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n")
    assert d2g_main(["collect", "--teacher", sd_folder, "--prompts", str(empty),
                     "--num-pairs", "2", "--out", str(tmp_path / "a")]) == 2
    assert "--prompts" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert d2g_main(["collect", "--teacher", sd_folder, "--num-pairs", "2",
                     "--out", str(blocker / "pairs")]) == 2
    assert "--out" in capsys.readouterr().err
    assert d2g_main(["collect", "--teacher", sd_folder, "--num-pairs", "0",
                     "--out", str(tmp_path / "b")]) == 2
    assert "--num-pairs" in capsys.readouterr().err
    assert d2g_main(["collect", "--teacher", str(tmp_path / "missing"), "--num-pairs", "2",
                     "--out", str(tmp_path / "c")]) == 2
    assert "--teacher" in capsys.readouterr().err


def test_collect_cli_registry_survives_a_broken_subcommand(monkeypatch, capsys):
    from d2g_fast import cli

    monkeypatch.setitem(cli.SUBCOMMANDS, "broken", "d2g_fast.no_such_module_for_test")
    assert cli.main(["broken"]) == 1
    assert "no_such_module_for_test" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["verify", "--help"])
    assert "--recompute" in capsys.readouterr().out


def test_collect_unwritable_output_folder(sd_folder, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; the not-a-folder case is tested above")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    teacher = Teacher.from_pretrained(sd_folder)
    with pytest.raises(PermissionError, match="--out"):
        collect(teacher, ["a cat"], str(ro / "pairs"), 2, steps=2, progress=False)


def test_collect_warns_once_about_long_prompts(sd_folder, tmp_path):
    teacher = Teacher.from_pretrained(sd_folder)
    prompts = ["a short one", "word " * 90, "another short one", "many words " * 40]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        collect(teacher, prompts, str(tmp_path / "pairs"), 4, steps=2, batch_size=4,
                shard_size=4, progress=False, log=lambda *_: None)
    longs = [w for w in caught if "tokenizer limit" in str(w.message)]
    assert len(longs) == 1, [str(w.message) for w in caught]
    assert "2 of 4 prompts" in str(longs[0].message) and "--prompts" in str(longs[0].message)


def test_collect_refuses_nan_latents(sd_folder, tmp_path):
    teacher = Teacher.from_pretrained(sd_folder)
    with torch.no_grad():
        teacher.unet.conv_out.weight[0, 0, 0, 0] = float("inf")
    out = str(tmp_path / "pairs")
    with pytest.raises(NonFiniteLatentError, match="nothing was stored"):
        collect(teacher, ["a cat", "a dog"], out, 4, steps=2, batch_size=2, shard_size=2,
                progress=False, log=lambda *_: None)
    assert not [n for n in os.listdir(out) if n.startswith("shard-")]
    assert not json.load(open(os.path.join(out, "manifest.json")))["complete"]


# ---------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.float16, 3e-2),
                                       (torch.bfloat16, 1e-1)])
def test_collect_cuda_teacher_matches_pipeline(sd_folder, dtype, tol):
    """On the GPU, with the fast options (channels_last, fused QKV), against the diffusers
    pipeline in the same dtype. Tolerance relative to the latent scale: half precision and
    kernel choices differ between the two memory layouts."""
    pipe = StableDiffusionPipeline.from_pretrained(sd_folder, local_files_only=True,
                                                   torch_dtype=dtype).to("cuda")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    teacher = Teacher.from_pretrained(sd_folder, dtype=dtype, device="cuda")
    teacher.optimize(channels_last=True, fuse_qkv=True)
    prompts = load_prompts(None)[:4]
    noise = torch.randn(4, *teacher.latent_shape, generator=torch.Generator().manual_seed(0))
    ref = pipe(prompts, latents=noise.to("cuda", dtype), num_inference_steps=8,
               guidance_scale=6.0, output_type="latent").images.float()
    ours = teacher.sample(noise, prompts, steps=8, guidance=6.0)
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err <= tol * max(1.0, scale), f"{dtype}: max err {err:.3g}, latent scale {scale:.3g}"


@pytest.mark.cuda
def test_collect_cuda_command_and_verify(sd_folder, tmp_path, capsys):
    out = str(tmp_path / "pairs")
    assert d2g_main(["collect", "--teacher", sd_folder, "--num-pairs", "6", "--shard-size", "4",
                     "--batch-size", "3", "--steps", "6", "--device", "cuda", "--dtype",
                     "float16", "--no-progress", "--out", out]) == 0
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["complete"] and manifest["config"]["dtype"] == "float16"
    assert manifest["cost"]["devices"] == [torch.cuda.get_device_name()]
    assert d2g_main(["verify", out, "--recompute", "3", "--device", "cuda"]) == 0
    assert "intact" in capsys.readouterr().out


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_collect_cuda_graphs_match_eager(kind, sd_folder, sdxl_folder):
    folder = sd_folder if kind == "sd" else sdxl_folder
    eager = Teacher.from_pretrained(folder, dtype="float16", device="cuda")
    eager.optimize(channels_last=True)
    graphed = Teacher.from_pretrained(folder, dtype="float16", device="cuda")
    graphed.optimize(channels_last=True, cuda_graphs=True)
    prompts = load_prompts(None)[:3]
    for seed in (0, 1):  # the second batch replays the captured graph with new inputs
        noise = torch.randn(3, *eager.latent_shape, generator=torch.Generator().manual_seed(seed))
        a = eager.sample(noise, prompts, steps=6, guidance=6.0)
        b = graphed.sample(noise, prompts, steps=6, guidance=6.0)
        err = (a - b).abs().max().item()
        assert err <= 1e-3 * max(1.0, a.abs().max().item()), f"{kind} seed {seed}: {err:.3g}"
    assert graphed._unet_forward.failed is None and len(graphed._unet_forward.graphs) == 1
