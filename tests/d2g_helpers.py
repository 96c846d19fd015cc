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
