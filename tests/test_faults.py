"""Fault injection on the real commands (d2g distill, collect, verify, lpips train-trunk,
export): preemption signals at random steps, a full disk (a small tmpfs where this machine can
mount one, else ENOSPC injected at a chosen write), a flipped byte in a checkpoint, a read-only
--out, a second command on a folder in use, a kill while writing. Each ends with nothing lost
and, once the fault is cleared, a result identical to an uninterrupted run.

Tiny SD-shaped teacher, 6 training steps, one thread. Commands run in-process through
d2g_fast.cli.main where a signal is not needed from outside, else as subprocesses."""
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch
from d2g_helpers import one_thread

pytest.importorskip("diffusers")

from d2g_fast.cli import main as d2g_main  # noqa: E402
from d2g_fast.data import load_prompts  # noqa: E402
from d2g_fast.data.store import read_manifest, verify_store  # noqa: E402
from d2g_fast.runtime import EXIT_DISK, EXIT_LOCKED, EXIT_REQUEUE  # noqa: E402
from d2g_fast.runtime.diskspace import FAULT_ENV as ENOSPC_ENV  # noqa: E402
from d2g_fast.runtime.lock import LOCK_FILE  # noqa: E402
from d2g_fast.teacher import Teacher, collect  # noqa: E402
from d2g_fast.testing import save_tiny_sd_pipeline  # noqa: E402
from d2g_fast.train import TrainConfig, train  # noqa: E402
from d2g_fast.train.checkpoint import FAULT_ENV as KILL_ENV  # noqa: E402
from d2g_fast.train.checkpoint import list_checkpoints, verify_checkpoint  # noqa: E402
from d2g_fast.train.log import TIMING_COLUMNS, MetricsLog  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
COLLECT = dict(steps=4, guidance=3.0, batch_size=8, shard_size=16)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(teacher folder, pair store) and an uninterrupted reference run of STEPS steps."""
    root = str(tmp_path_factory.mktemp("faults"))
    with one_thread():
        teacher = save_tiny_sd_pipeline(os.path.join(root, "teacher"), seed=1)
        collect(Teacher.from_pretrained(teacher), load_prompts(None), os.path.join(root, "pairs"),
                40, progress=False, log=lambda *a: None, **COLLECT)
        world = {"teacher": teacher, "pairs": os.path.join(root, "pairs"), "root": root}
        train(_config(world, os.path.join(root, "ref")), log=lambda *a: None)
    return world


def _config(world, out, **kw):
    base = dict(teacher=world["teacher"], pairs=world["pairs"], out=str(out), lpips_random=True,
                batch_size=4, max_steps=STEPS, log_every=1, checkpoint_every=2, lr_g=3e-4,
                lr_d=1e-4, lambda_gan=0.1, r1_interval=2, progress=False, seed=5)
    base.update(kw)
    return TrainConfig(**base)


def _args(config: TrainConfig) -> list[str]:
    args, defaults = ["distill"], TrainConfig().to_dict()
    for key, value in config.to_dict().items():
        if key == "progress" or value == defaults[key] or value in (None, [], ""):
            continue
        flag = "--" + key.replace("_", "-")
        args += [flag] if isinstance(value, bool) else [flag, str(value)]
    return args + ["--no-progress"]


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, HF_HUB_OFFLINE="1")
    env.update(extra)
    return env


def _rows(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS}
            for r in MetricsLog.read(os.path.join(run_dir, "metrics.csv"))]


def _weights(run_dir, step=STEPS):
    """The recorded sha256 of every file of a checkpoint but the RNG and state files."""
    path = os.path.join(run_dir, "checkpoints", f"step-{step:07d}", "complete.json")
    files = json.load(open(path))["files"]
    return {k: v["sha256"] for k, v in files.items() if k.endswith((".safetensors", ".pt"))
            and not k.startswith("rng")}


def _assert_equals_reference(world, run_dir):
    ref = os.path.join(world["root"], "ref")
    assert _rows(run_dir) == _rows(ref)
    assert _weights(run_dir) == _weights(ref)  # bit-identical networks and optimiser states


def _assert_clean(run_dir):
    """No temporary checkpoint folder, no lock left behind, every checkpoint intact."""
    names = os.listdir(os.path.join(run_dir, "checkpoints"))
    assert not [n for n in names if n.startswith(".tmp")], names
    assert not os.path.exists(os.path.join(run_dir, LOCK_FILE))
    for _, path in list_checkpoints(run_dir):
        assert verify_checkpoint(path) == [], path


def _wait_for(predicate, proc, timeout=240):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


# ------------------------------------------------------------------------------ preemption
def test_distill_sigterm_twice_saves_one_checkpoint_and_resumes_exactly(world, tmp_path, capsys):
    """As a scheduler does, the signal goes to every process of the job (its DataLoader worker
    too), twice."""
    step = random.Random().randrange(1, 4)  # the step the signal follows (random each run)
    config = _config(world, tmp_path / "run", checkpoint_every=100, num_workers=1)
    proc = subprocess.Popen([sys.executable, "-m", "d2g_fast.cli", *_args(config)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    metrics = os.path.join(config.out, "metrics.csv")
    _wait_for(lambda: os.path.exists(metrics) and len(MetricsLog.read(metrics)) >= step, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # a second signal while stopping/saving changes nothing
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_REQUEUE, (step, err[-3000:])
    assert "Traceback" not in err and "preempted (SIGTERM)" in err, err
    saved = [s for s, _ in list_checkpoints(config.out)]
    assert len(saved) == 1 and step <= saved[0] < STEPS, (step, saved)
    _assert_clean(config.out)
    assert d2g_main(_args(config)) == 0  # the requeued job: the same command
    assert f"resuming from" in capsys.readouterr().out
    _assert_equals_reference(world, config.out)


def test_lpips_train_trunk_signal_at_a_random_step_resumes_exactly(tmp_path, monkeypatch, capsys):
    """The signal is delivered to this process by the trunk's own step (a chosen, random step)."""
    from safetensors.torch import load_file

    import d2g_fast.lpips.trunk as trunk

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % 4
    torch.save({"latents": torch.randn(4, 4, 8, 8, generator=g)[labels]
                + torch.randn(64, 4, 8, 8, generator=g), "labels": labels}, tmp_path / "data.pt")
    common = ["lpips", "train-trunk", "--data", str(tmp_path / "data.pt"), "--encoder", "sd15",
              "--width-div", "8", "--steps", "8", "--batch-size", "16", "--checkpoint-every", "0",
              "--no-progress"]
    assert d2g_main(common + ["--output", str(tmp_path / "straight.safetensors")]) == 0
    at = random.Random().randrange(1, 7)
    lr = trunk.learning_rate

    def signal_at(step, *a):
        if step == at:
            os.kill(os.getpid(), signal.SIGUSR1)
        return lr(step, *a)

    monkeypatch.setattr(trunk, "learning_rate", signal_at)
    out = str(tmp_path / "killed.safetensors")
    assert d2g_main(common + ["--output", out]) == EXIT_REQUEUE, at
    assert "preempted (SIGUSR1)" in capsys.readouterr().err
    assert torch.load(out + ".ckpt", weights_only=True)["step"] == at + 1
    assert d2g_main(["verify", out + ".ckpt"]) == 0
    monkeypatch.setattr(trunk, "learning_rate", lr)
    assert d2g_main(common + ["--output", out]) == 0
    a, b = load_file(out), load_file(str(tmp_path / "straight.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)
    # A flipped byte in the checkpoint: named by d2g verify, refused by the resume.
    data = bytearray(open(out + ".ckpt", "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(out + ".ckpt", "wb").write(bytes(data))
    capsys.readouterr()
    assert d2g_main(["verify", out + ".ckpt"]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert d2g_main(common + ["--output", out, "--steps", "9"]) == 2
    assert "damaged" in capsys.readouterr().err


def test_collect_configured_signal_finishes_the_shard_and_resumes(world, tmp_path):
    out = str(tmp_path / "pairs")
    cmd = [sys.executable, "-m", "d2g_fast.cli", "--preempt-signals", "SIGUSR2", "collect",
           "--teacher", world["teacher"], "--num-pairs", "40", "--out", out, "--no-progress",
           *[x for k, v in COLLECT.items() for x in ("--" + k.replace("_", "-"), str(v))]]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_for(lambda: os.path.exists(os.path.join(out, "shard-00000.json")), proc)
    proc.send_signal(signal.SIGUSR2)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_REQUEUE and "Traceback" not in err, err[-3000:]
    assert not read_manifest(out)["complete"]
    assert d2g_main(cmd[3:]) == 0
    _assert_same_store(out, world["pairs"])


def _assert_same_store(out, ref):
    assert verify_store(out) == []
    shards = lambda root: [(s["file"], s["sha256"]) for s in read_manifest(root)["shards"]]  # noqa: E731
    assert shards(out) == shards(ref)


# ------------------------------------------------------------------------------ full disk
def _mount_tmpfs(path, size) -> bool:
    os.makedirs(path, exist_ok=True)
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.parametrize("disk", ["tmpfs", "injected"])
def test_distill_full_disk_while_checkpointing(world, tmp_path, monkeypatch, capsys, disk):
    mount = str(tmp_path / "disk")
    if disk == "tmpfs":
        # Room for the run folder and one checkpoint (~27 MB each) but not a second.
        if not _mount_tmpfs(mount, "40m"):
            pytest.skip("cannot mount a tmpfs here (not root, or no CAP_SYS_ADMIN); the "
                        "injected form covers the same path")
    else:
        monkeypatch.setenv(ENOSPC_ENV, "step-0000004")
    try:
        config = _config(world, os.path.join(mount, "run"))
        assert d2g_main(_args(config)) == EXIT_DISK
        err = capsys.readouterr().err
        assert "no space left on the device" in err and "needed" in err and "free" in err, err
        assert "Traceback" not in err
        assert [s for s, _ in list_checkpoints(config.out)] == [2]  # the older one, intact
        _assert_clean(config.out)
        if disk == "tmpfs":
            subprocess.run(["mount", "-o", "remount,size=200m", mount], check=True)
        else:
            monkeypatch.delenv(ENOSPC_ENV)
        assert d2g_main(_args(config)) == 0
        _assert_equals_reference(world, config.out)
    finally:
        if disk == "tmpfs":
            subprocess.run(["umount", mount], capture_output=True)


def test_collect_full_disk_then_completes_and_verifies(world, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "pairs")
    cmd = ["collect", "--teacher", world["teacher"], "--num-pairs", "40", "--out", out,
           "--no-progress", *[x for k, v in COLLECT.items()
                              for x in ("--" + k.replace("_", "-"), str(v))]]
    monkeypatch.setenv(ENOSPC_ENV, "shard-00001.safetensors")
    assert d2g_main(cmd) == EXIT_DISK
    err = capsys.readouterr().err
    assert "no space left on the device" in err and "shard-00001" in err and "Traceback" not in err
    names = sorted(os.listdir(out))
    assert "shard-00000.safetensors" in names and "shard-00001.safetensors" not in names
    assert not [n for n in names if ".tmp-" in n or n == LOCK_FILE], names
    monkeypatch.delenv(ENOSPC_ENV)
    assert d2g_main(cmd) == 0
    assert d2g_main(["verify", out]) == 0
    _assert_same_store(out, world["pairs"])


# ------------------------------------------------------------------------------ checksums
def _flip_byte(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))


def test_flipped_byte_in_newest_checkpoint_is_named_and_never_loaded(world, tmp_path, capsys):
    run = str(tmp_path / "run")
    shutil.copytree(os.path.join(world["root"], "ref"), run)
    newest = os.path.join(run, "checkpoints", f"step-{STEPS:07d}")
    _flip_byte(os.path.join(newest, "generator.safetensors"))
    assert d2g_main(["verify", run]) == 1
    out = capsys.readouterr().out
    assert f"FAIL checkpoint step {STEPS}" in out and "generator.safetensors: sha256" in out, out
    config = _config(world, run)
    assert d2g_main(_args(config)) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {newest} is damaged" in out and "never loaded" in out, out
    assert f"resuming from {os.path.join(run, 'checkpoints', 'step-0000004')}" in out
    assert os.path.isdir(os.path.join(run, "checkpoints", f"damaged-step-{STEPS:07d}"))
    _assert_equals_reference(world, run)
    assert d2g_main(["verify", run]) == 0
    _flip_byte(os.path.join(newest, "ema.safetensors"))  # d2g export refuses it too
    assert d2g_main(["export", run, "--out", str(tmp_path / "exp")]) == 2
    assert "is damaged" in capsys.readouterr().err and not (tmp_path / "exp").exists()
    shutil.rmtree(os.path.join(run, "checkpoints", f"damaged-step-{STEPS:07d}"))
    # Every checkpoint damaged: refused, nothing loaded, nothing moved.
    for _, path in list_checkpoints(run):
        _flip_byte(os.path.join(path, "optimizer_d.pt"))
    before = sorted(os.listdir(os.path.join(run, "checkpoints")))
    assert d2g_main(_args(config)) == 2
    assert "every checkpoint" in capsys.readouterr().err
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == before


# ------------------------------------------------------------------------------ read-only
def test_read_only_out_is_refused_before_loading(world, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    try:
        for argv in (_args(_config(world, ro)),
                     ["collect", "--teacher", world["teacher"], "--num-pairs", "8", "--out", str(ro)],
                     ["export", os.path.join(world["root"], "ref"), "--out", str(ro)],
                     ["lpips", "train-trunk", "--data", "missing.pt", "--encoder", "sd15",
                      "--output", str(ro / "trunk.safetensors")]):
            t0 = time.perf_counter()
            assert d2g_main(argv) == 2, argv
            err = capsys.readouterr().err
            assert "read-only" in err and ("--out" in err or "--output" in err), err
            assert time.perf_counter() - t0 < 30
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


# ------------------------------------------------------------------------------ one writer
def test_second_distill_is_refused_and_the_first_equals_an_undisturbed_run(world, tmp_path,
                                                                          capsys):
    config = _config(world, tmp_path / "run")
    first = subprocess.Popen([sys.executable, "-m", "d2g_fast.cli", *_args(config)], env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: list_checkpoints(config.out), first)
    listing = sorted(os.listdir(config.out))
    assert d2g_main(_args(config)) == EXIT_LOCKED
    err = capsys.readouterr().err
    assert f"in use by d2g distill (pid {first.pid}" in err and "Traceback" not in err, err
    _, err = first.communicate(timeout=240)
    assert first.returncode == 0, err[-3000:]
    assert set(listing) - {LOCK_FILE} <= set(os.listdir(config.out))  # nothing removed
    _assert_clean(config.out)
    _assert_equals_reference(world, config.out)


def test_kill_while_writing_leaves_a_stale_lock_that_is_taken_over(world, tmp_path, capsys):
    config = _config(world, tmp_path / "run")
    proc = subprocess.run([sys.executable, "-m", "d2g_fast.cli", *_args(config)],
                          env=_env(**{KILL_ENV: "4"}), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    holder = json.load(open(os.path.join(config.out, LOCK_FILE)))
    assert holder["command"] == "d2g distill" and holder["pid"] != os.getpid()
    assert os.path.isdir(os.path.join(config.out, "checkpoints", ".tmp-step-0000004"))
    assert d2g_main(_args(config)) == 0
    out = capsys.readouterr().out
    assert "took over the stale lock" in out and "resuming from" in out, out
    _assert_clean(config.out)
    _assert_equals_reference(world, config.out)


# ------------------------------------------------------------------------------ export, eval
def test_export_records_checksums_and_a_full_disk_leaves_no_folder(world, tmp_path, monkeypatch,
                                                                   capsys):
    ref = os.path.join(world["root"], "ref")
    full = str(tmp_path / "exp-full")
    monkeypatch.setenv(ENOSPC_ENV, "exp-full")
    assert d2g_main(["export", ref, "--out", full]) == EXIT_DISK
    err = capsys.readouterr().err
    assert "no space left on the device" in err and "Traceback" not in err, err
    assert not os.path.exists(full)  # the folder this export created is gone, nothing partial
    monkeypatch.delenv(ENOSPC_ENV)
    out = str(tmp_path / "exp")
    assert d2g_main(["export", ref, "--out", out]) == 0
    info = json.load(open(os.path.join(out, "d2g_student.json")))
    assert "unet/diffusion_pytorch_model.safetensors" in info["files"]
    assert d2g_main(["verify", out]) == 0
    _flip_byte(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))
    capsys.readouterr()
    assert d2g_main(["verify", out]) == 1
    assert "FAIL unet/diffusion_pytorch_model.safetensors" in capsys.readouterr().out


def test_eval_signal_between_shards_resumes_to_the_same_report(world, tmp_path, monkeypatch,
                                                               capsys):
    from eval_fixtures import save_tiny_inception, write_captions, write_reference_images

    import d2g_fast.eval.generate as gen

    d = tmp_path
    args = ["eval", "--model", world["teacher"], "--captions", write_captions(str(d / "c.txt"), 16),
            "--reference", write_reference_images(str(d / "reference"), 12),
            "--inception-weights", save_tiny_inception(str(d / "inception.pt")),
            "--num-images", "16", "--resolution", "16", "--steps", "2", "--batch-size", "8",
            "--shard-size", "8"]
    assert d2g_main(args + ["--out", str(d / "straight")]) == 0
    make_shard = gen.make_shard

    def signal_in_first_shard(start, *a, **k):
        if start == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return make_shard(start, *a, **k)

    monkeypatch.setattr(gen, "make_shard", signal_in_first_shard)
    assert d2g_main(args + ["--out", str(d / "run")]) == EXIT_REQUEUE
    assert "d2g eval: preempted (SIGTERM)" in capsys.readouterr().err
    assert sorted(os.listdir(d / "run" / "shards")) == ["shard-00000.json",
                                                        "shard-00000.safetensors"]
    monkeypatch.setattr(gen, "make_shard", make_shard)
    assert d2g_main(args + ["--out", str(d / "run")]) == 0
    report = lambda name: json.load(open(d / name / "report.json"))["metrics"]  # noqa: E731
    assert report("run") == report("straight")


# ------------------------------------------------------------------------------ the helpers
def test_lock_holders_live_dead_reused_remote_and_requeued(tmp_path, monkeypatch):
    import socket

    from d2g_fast.runtime.lock import FolderLock, FolderLockedError

    def holder(**kw):
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": "d2g distill",
                  "started": "then", **kw}
        json.dump(record, open(tmp_path / LOCK_FILE, "w"))

    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        holder(pid=sleeper.pid)
        with pytest.raises(FolderLockedError, match=f"pid {sleeper.pid} on"):
            FolderLock(str(tmp_path), "d2g collect").acquire()
        holder(pid=sleeper.pid, process_start="1")  # the pid now belongs to another process
        FolderLock(str(tmp_path), "d2g collect").acquire().release()
    finally:
        sleeper.kill()
        sleeper.wait()
    holder(pid=sleeper.pid)  # its process is gone
    taken = []
    FolderLock(str(tmp_path), "d2g collect").acquire(taken.append).release()
    assert "took over the stale lock" in taken[0] and not (tmp_path / LOCK_FILE).exists()
    holder(host="another-node", job={"SLURM_JOB_ID": "7"})  # cannot be checked: honoured
    with pytest.raises(FolderLockedError, match="another-node"):
        FolderLock(str(tmp_path), "d2g distill").acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "7")  # ... unless it is this job before its requeue
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    FolderLock(str(tmp_path), "d2g distill").acquire().release()


def test_signal_names_and_read_only_parent(tmp_path, capsys, monkeypatch):
    from d2g_fast.runtime.signals import SIGNALS_ENV, signal_names

    assert signal_names("usr2, SIGTERM") == ["SIGUSR2", "SIGTERM"]
    monkeypatch.delenv(SIGNALS_ENV, raising=False)
    assert signal_names() == ["SIGTERM", "SIGUSR1"]
    monkeypatch.setenv(SIGNALS_ENV, "12")
    assert signal_names() == ["SIGUSR2"]
    with pytest.raises(ValueError, match="--preempt-signals"):
        signal_names("SIGKILL")
    with pytest.raises(ValueError, match="unknown signal"):
        signal_names("SIGNOPE")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert d2g_main(["distill", "--teacher", "x", "--pairs", "y",
                         "--out", str(ro / "new" / "run")]) == 2
        assert "read-only" in capsys.readouterr().err and not (ro / "new").exists()
    finally:
        ro.chmod(0o755)
