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
