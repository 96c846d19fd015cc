"""Helpers shared by several test files (import as `from d2g_helpers import ...`)."""
import contextlib

import torch


def randomize_batchnorm(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics and affine parameters, so folding is really tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.1)


@contextlib.contextmanager
def one_thread():
    """Run on one intra-op thread: tiny models and tensors run 10-100x faster and steadier that
    way than with OpenMP on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def emulated_ops(tmp_path_factory, cu_file: str, name: str, extra_sources=(), **kwargs):
    """Build a CUDA kernel file of csrc/ as a CPU extension through tools/cuda_emu and return its
    op namespace ``torch.ops.<name>`` (paths relative to csrc/; kwargs: replacements, prelude)."""
    import importlib.util
    import os

    import pytest
    pytest.importorskip("ninja")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "cuda_emu", os.path.join(root, "tools", "cuda_emu", "emulate.py"))
    emu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(emu)
    csrc = os.path.join(root, "csrc")
    emu.load_emulated(os.path.join(csrc, cu_file), name,
                      [os.path.join(csrc, e) for e in extra_sources],
                      str(tmp_path_factory.mktemp(name)), **kwargs)
    return getattr(torch.ops, name)


def sigkill_after_checkpoint(cmd, env, run_dir: str, step: int = 2, timeout: float = 120.0):
    """Start ``cmd`` (a d2g distill command line), SIGKILL it as soon as the checkpoint of
    ``step`` in ``run_dir`` is complete (or it exits, or ``timeout`` passes); returns the steps
    of the complete checkpoints left behind."""
    import os
    import signal
    import subprocess
    import time

    from d2g_fast.train.checkpoint import list_checkpoints

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = os.path.join(run_dir, "checkpoints", f"step-{step:07d}", "complete.json")
    deadline = time.time() + timeout
    while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    return [s for s, _ in list_checkpoints(run_dir)]


def metrics_rows(run_dir: str) -> list[dict]:
    """The rows of a run folder's metrics.csv."""
    import os

    from d2g_fast.train.log import MetricsLog

    return MetricsLog.read(os.path.join(run_dir, "metrics.csv"))


def without_timings(rows: list[dict]) -> list[dict]:
    """``rows`` without the timing columns (they differ between any two runs)."""
    from d2g_fast.train.log import TIMING_COLUMNS

    return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows]


def checkpoints_equal(a: str, b: str, atol: float = 0.0) -> bool:
    """Whether G, its EMA and D of the last checkpoints of the run folders ``a`` and ``b`` agree
    (exactly, by default)."""
    import os

    from safetensors.torch import load_file

    from d2g_fast.train.checkpoint import list_checkpoints

    def last(run_dir, name):
        step = list_checkpoints(run_dir)[-1][0]
        return load_file(os.path.join(run_dir, "checkpoints", f"step-{step:07d}",
                                      f"{name}.safetensors"))

    for name in ("generator", "ema", "discriminator"):
        ta, tb = last(a, name), last(b, name)
        if not all(torch.allclose(ta[k], tb[k], atol=atol, rtol=0) for k in ta):
            return False
    return True


def assert_resume_after_sigkill_while_writing_is_exact(make_config, distill_cmd, env):
    """A run SIGKILLed while writing its step-4 checkpoint (checkpoint.FAULT_ENV) keeps only
    step 2's checkpoint (step 4's partial folder is left behind), and resumes to the metrics and
    weights of the same run without the kill, clearing the partial folder.
    ``make_config(name)`` gives the TrainConfig (6 steps, a checkpoint every 2) of the run in
    folder ``name``; the killed run is started as ``distill_cmd(config)`` in the environment
    ``env(**extra)``; the unbroken run and the resume train in this process."""
    import os
    import signal
    import subprocess

    from d2g_fast.train import train
    from d2g_fast.train.checkpoint import FAULT_ENV, list_checkpoints

    def partial_folders(run_dir):
        return [n for n in os.listdir(os.path.join(run_dir, "checkpoints"))
                if n.startswith(".tmp-")]

    ref = make_config("ref")
    train(ref, log=lambda *a: None)
    killed = make_config("killed")
    proc = subprocess.run(distill_cmd(killed), env=env(**{FAULT_ENV: "4"}),
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [s for s, _ in list_checkpoints(killed.out)] == [2]  # step 4's is not complete
    assert partial_folders(killed.out) == [".tmp-step-0000004"]
    train(killed, log=lambda *a: None)  # --resume auto
    assert partial_folders(killed.out) == []
    assert without_timings(metrics_rows(killed.out)) == without_timings(metrics_rows(ref.out))
    assert checkpoints_equal(ref.out, killed.out)


def weights_apart(teacher_dir: str, one: str, two: str, step: int = 4) -> tuple[float, float]:
    """(|G_one - G_two|, |G_one - G_init|) over all of G's weights at checkpoint ``step`` of the
    run folders ``one`` and ``two``; G_init is the teacher's network (``unet/`` or
    ``transformer/``), and zero for parameters the teacher has not (G's zero-initialised guidance
    input). Adam turns rounding-level gradient differences of near-zero gradients into steps of
    up to the learning rate: compare the weights' difference with how far training moved them."""
    import os

    from safetensors.torch import load_file

    sub = "unet" if os.path.isdir(os.path.join(teacher_dir, "unet")) else "transformer"
    init = load_file(os.path.join(teacher_dir, sub, "diffusion_pytorch_model.safetensors"))
    name = os.path.join("checkpoints", f"step-{step:07d}", "generator.safetensors")
    g1, g2 = load_file(os.path.join(one, name)), load_file(os.path.join(two, name))
    moved = torch.cat([(g1[k] - init.get(k, torch.zeros_like(g1[k]))).flatten() for k in g1])
    apart = torch.cat([(g1[k] - g2[k]).flatten() for k in g1])
    return float(apart.norm()), float(moved.norm())
