"""Networks without memory: the trainer's own modules built on fake tensors.

A :class:`~torch._subclasses.fake_tensor.FakeTensorMode` tensor carries shape, dtype, device and
storage identity but no data, so the real ``build_run`` and the real step functions run on it at
any size (SDXL, FLUX) in seconds, and :class:`d2g_fast.plan.tracker.LiveBytes` counts what they
would allocate. The tensors pose as CPU tensors, so the CPU's kernel choices apply (autocast's
bf16 op list, the fused attention that saves its output and log-sum-exp rather than the
probabilities), which are also the choices of the GPU path.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch
from torch._subclasses.fake_tensor import FakeTensorMode


def _apply_without_swap(self, fn, recurse=True):
    """``nn.Module._apply`` for fake parameters: torch swaps tensors in place there, which
    fails when the conversion is a no-op (``.float()`` of a float32 parameter); a new Parameter
    is assigned instead, and an unchanged one is kept."""
    if recurse:
        for child in self.children():
            child._apply(fn)
    for key, param in self._parameters.items():
        if param is None:
            continue
        with torch.no_grad():
            applied = fn(param)
        if applied is not param:
            self._parameters[key] = torch.nn.Parameter(applied, requires_grad=param.requires_grad)
    for key, buf in self._buffers.items():
        if buf is not None:
            self._buffers[key] = fn(buf)
    return self


def _real_augment_draws(original):
    """``PairedAugment.sample_params`` drawing on real tensors: the host sampler reads its draws
    back with numpy (a few floats per sample, nothing the memory plan needs to see)."""
    def sample_params(self, x, generator=None, debug_percentile=None):
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():
            shaped = torch.empty(x.shape, dtype=x.dtype, device="meta")
            return original(self, shaped, generator, debug_percentile)
    return sample_params


FUSED_TRUNK_ENV = "D2G_FUSED_TRUNK"  # d2g_fast.nn.latent_vgg's switch of its CPU-only trunk


@contextlib.contextmanager
def portable_trunk():
    """E-LatentLPIPS's CPU-only fused trunk (oneDNN post-ops) off inside: the plan models the
    trunk every device runs, and fake tensors have no oneDNN kernels."""
    saved = os.environ.get(FUSED_TRUNK_ENV)
    os.environ[FUSED_TRUNK_ENV] = "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(FUSED_TRUNK_ENV, None)
        else:
            os.environ[FUSED_TRUNK_ENV] = saved


@contextlib.contextmanager
def fake_tensors():
    """Inside, every new tensor is fake (no memory), modules convert without swapping, and the
    augmentation draws its (tiny) parameters on real tensors."""
    from d2g_fast.nn.augment import PairedAugment

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    saved = torch.nn.Module._apply, PairedAugment.sample_params
    torch.nn.Module._apply = _apply_without_swap
    PairedAugment.sample_params = _real_augment_draws(saved[1])
    try:
        with mode, portable_trunk(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FakeTensor data_ptr deprecation noise
            yield mode
    finally:
        torch.nn.Module._apply, PairedAugment.sample_params = saved
