"""--overlap-phases (CPU): G's loss and backward beside D's step on a second thread.

The overlapped step computes the sequential step's gradients (fp32 rounding apart: each kernel
runs on half the threads), really runs D's phase on the other thread with half the threads, is
deterministic and resumes exactly (R1 and warm-up steps included), waits for D's thread when G's
phase fails, and is refused where the two threads would race or cannot help."""
import contextlib
import os
import shutil
import threading

import pytest
import torch
from d2g_helpers import checkpoints_equal

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from d2g_fast.data import load_prompts  # noqa: E402
from d2g_fast.teacher import Teacher, collect  # noqa: E402
from d2g_fast.testing import save_tiny_sd_pipeline  # noqa: E402
from d2g_fast.train import TrainConfig, train  # noqa: E402
from d2g_fast.train import step as step_module  # noqa: E402
from d2g_fast.train.build import build_run  # noqa: E402
from d2g_fast.train.checkpoint import list_checkpoints  # noqa: E402


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("overlap"))
    with threads(1):
        teacher_dir = save_tiny_sd_pipeline(os.path.join(root, "teacher"), seed=0)
        collect(Teacher.from_pretrained(teacher_dir), load_prompts(None),
                os.path.join(root, "pairs"), 32, steps=4, guidance=3.0, batch_size=8,
                shard_size=16, progress=False, log=lambda *a: None)
    return teacher_dir, os.path.join(root, "pairs")


def _config(world, out, **kw):
    teacher, pairs = world
    base = dict(teacher=teacher, pairs=pairs, out=str(out), lpips_random=True, batch_size=4,
                max_steps=6, log_every=1, checkpoint_every=2, keep_checkpoints=0, lr_g=3e-4,
                lr_d=1e-4, lambda_gan=0.1, r1_interval=3, warmup_steps=1, progress=False,
                seed=3, device="cpu", overlap_phases=True)
    base.update(kw)
    return TrainConfig(**base).validate()


def _batch(run, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(run.dataset), (run.config.batch_size,), generator=g).tolist()
    return torch.utils.data.default_collate([run.dataset[i] for i in idx])


def _grads(module) -> dict:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def test_overlapped_phases_give_the_sequential_gradients(world, tmp_path, monkeypatch):
    """One micro-batch (a GAN step, not an R1 step): G's and D's gradients and the logged losses
    of the overlapped phases equal the sequential ones; D's phase ran on the pool's thread with
    half of the threads while G's ran here."""
    seen = {}
    d_phase = step_module.discriminator_micro_step

    def recording(*args):
        seen["thread"] = threading.current_thread().name
        seen["threads"] = torch.get_num_threads()
        return d_phase(*args)

    with threads(2):
        sequential = build_run(_config(world, tmp_path / "a", overlap_phases=False))
        overlapped = build_run(_config(world, tmp_path / "b"))
        assert overlapped.phase_pool is not None and sequential.phase_pool is None
        step = 1
        assert step_module.overlaps(overlapped, step)
        batch = _batch(sequential)
        m = step_module.prepare_micro_batch(sequential, batch, step, 0)
        want = step_module.generator_micro_step(sequential, m, step, 1.0)
        want.update(step_module.discriminator_micro_step(sequential, m, step, 1.0))
        monkeypatch.setattr(step_module, "discriminator_micro_step", recording)
        m = step_module.prepare_micro_batch(overlapped, batch, step, 0)
        got = step_module.overlapped_micro_step(overlapped, m, step, 1.0)
        assert torch.get_num_threads() == 2  # restored after the phases
    assert seen == {"thread": seen["thread"], "threads": 1}
    assert seen["thread"].startswith("d2g-d-phase")
    assert set(got) == set(want)
    for key in want:
        if want[key] is None:
            assert got[key] is None, key
        else:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
    for net in ("generator", "discriminator"):
        a, b = _grads(getattr(sequential, net)), _grads(getattr(overlapped, net))
        assert a.keys() == b.keys() and a, net
        # Some gradients are rounding noise around 0 (biases before a GroupNorm): judge every
        # element against the network's largest gradient, and the whole by its norm.
        want_all = torch.cat([a[k].flatten() for k in a])
        got_all = torch.cat([b[k].flatten() for k in a])
        torch.testing.assert_close(got_all, want_all, rtol=1e-4,
                                   atol=1e-5 * want_all.abs().max().item(), msg=net)
        assert (got_all - want_all).norm() <= 1e-5 * want_all.norm(), net


def test_overlapped_training_is_deterministic_and_resumes_exactly(world, tmp_path):
    """Six steps (a warm-up step, R1 steps 0 and 3 run sequentially, the rest overlapped) twice
    give the same checkpoints; a run resumed from step 2 ends on the same weights."""
    with threads(2):
        one = _config(world, tmp_path / "one")
        train(one, log=lambda *a: None)
        two = _config(world, tmp_path / "two")
        train(two, log=lambda *a: None)
        assert checkpoints_equal(one.out, two.out)
        resumed = _config(world, tmp_path / "resumed")
        shutil.copytree(one.out, resumed.out)
        for step, path in list_checkpoints(resumed.out):
            if step > 2:
                shutil.rmtree(path)
        train(resumed, log=lambda *a: None)
        assert checkpoints_equal(one.out, resumed.out)


def test_an_error_in_g_phase_waits_for_d_phase(world, tmp_path, monkeypatch):
    finished = []
    d_phase = step_module.discriminator_micro_step

    def slow_d(*args):
        out = d_phase(*args)
        finished.append(True)
        return out

    def failing_g(*args):
        raise RuntimeError("G's phase failed")

    with threads(2):
        run = build_run(_config(world, tmp_path / "e"))
        monkeypatch.setattr(step_module, "discriminator_micro_step", slow_d)
        monkeypatch.setattr(step_module, "generator_loss_step", failing_g)
        m = step_module.prepare_micro_batch(run, _batch(run), 1, 0)
        with pytest.raises(RuntimeError, match="G's phase failed"):
            step_module.overlapped_micro_step(run, m, 1, 1.0)
        assert finished == [True]
        assert torch.get_num_threads() == 2


@pytest.mark.parametrize("kw, words", [
    (dict(fsdp=True), "--fsdp"),
    (dict(gradient_checkpointing=True), "--gradient-checkpointing"),
    (dict(light_d=True, lora_rank=2), "--light-d and --lora-rank"),
])
def test_refused_where_the_threads_would_race(world, tmp_path, kw, words):
    with pytest.raises(ValueError, match="overlap_phases \\(--overlap-phases\\)") as err:
        _config(world, tmp_path / "x", **kw)
    assert words in str(err.value)


def test_refused_on_a_gpu_device(world, tmp_path):
    with threads(2), pytest.raises(ValueError,
                                   match="overlap_phases \\(--overlap-phases\\)") as err:
        build_run(_config(world, tmp_path / "x", device="cuda"))
    assert "a CPU setting" in str(err.value)


def test_refused_on_one_thread(world, tmp_path):
    with threads(1), pytest.raises(ValueError, match="--overlap-phases.*at least 2 torch threads"):
        build_run(_config(world, tmp_path / "x"))
