"""The fused CPU trunk (ReLU as the conv's oneDNN post-op, one autograd function with the ReLU
mask folded into its backward): same taps and input gradients as the unfused fast path."""
from __future__ import annotations

import pytest
import torch
from d2g_helpers import randomize_batchnorm

from d2g_fast.nn.latent_vgg import FUSED_ENV, LatentVGG16BN, fused_trunk_supported

pytestmark = pytest.mark.skipif(not fused_trunk_supported(torch.device("cpu"), torch.float32),
                                reason="oneDNN (mkldnn._convolution_pointwise) not available")


@pytest.fixture(scope="module")
def trunk():
    torch.manual_seed(0)
    net = LatentVGG16BN(4)
    randomize_batchnorm(net)
    return net.eval()


def _taps_and_grad(net, x, proj, **kw):
    x = x.detach().requires_grad_(True)
    taps = net.fast_features(x, **kw)
    (g,) = torch.autograd.grad(sum((t.float() * p).sum() for t, p in zip(taps, proj)), x)
    with torch.no_grad():
        no_grad_taps = net.fast_features(x, **kw)
    return [t.detach() for t in taps], g, no_grad_taps


@pytest.mark.parametrize("dtype,channels_last,shape", [
    (torch.float32, False, (2, 4, 13, 11)),   # odd sizes: the pools floor
    (torch.float32, True, (2, 4, 16, 16)),
    (torch.bfloat16, True, (2, 4, 16, 16)),
    (torch.bfloat16, False, (1, 4, 9, 8)),
])
def test_fused_matches_unfused(trunk, dtype, channels_last, shape):
    x = torch.randn(*shape)
    proj = [torch.randn(t.shape) for t in trunk.fast_features(x, fused=False)]
    taps_u, g_u, ng_u = _taps_and_grad(trunk, x, proj, dtype=dtype, channels_last=channels_last,
                                      fused=False)
    taps_f, g_f, ng_f = _taps_and_grad(trunk, x, proj, dtype=dtype, channels_last=channels_last,
                                      fused=True)
    for k, (a, b, c) in enumerate(zip(taps_f, taps_u, ng_f)):
        # ReLU as a post-op computes the same numbers: the forward is bit-exact.
        assert torch.equal(a, b) and torch.equal(c, b), f"tap {k}"
        assert a.dtype == dtype
        assert a.is_contiguous(memory_format=torch.channels_last if channels_last
                               else torch.contiguous_format)
    assert g_f.dtype == x.dtype and g_f.shape == x.shape
    # The backward differs only in summation order (and, in bf16, where a tap's gradient is
    # rounded: the fused add happens before the rounding).
    rel = ((g_f - g_u).norm() / g_u.norm()).item()
    assert rel < (2e-2 if dtype == torch.bfloat16 else 1e-5), f"input gradient relative error {rel:.3g}"


def test_fused_bf16_gradient_as_close_to_fp32_as_unfused(trunk):
    x = torch.randn(2, 4, 16, 16)
    proj = [torch.randn(t.shape) for t in trunk.fast_features(x, fused=False)]
    _, g_ref, _ = _taps_and_grad(trunk, x, proj, fused=False)
    errs = {}
    for fused in (False, True):
        _, g, _ = _taps_and_grad(trunk, x, proj, dtype=torch.bfloat16, channels_last=True, fused=fused)
        errs[fused] = ((g - g_ref).norm() / g_ref.norm()).item()
    assert errs[True] < 1.1 * errs[False] + 1e-3, errs


def test_backward_leaves_incoming_gradients_untouched(trunk):
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    taps = trunk.fast_features(x, dtype=torch.bfloat16, channels_last=True, fused=True)
    grads = [torch.randn_like(t) for t in taps]
    before = [g.clone() for g in grads]
    torch.autograd.backward(taps, grads)
    assert all(torch.equal(a, b) for a, b in zip(grads, before))
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_auto_selection_and_switch(trunk, monkeypatch):
    cpu = torch.device("cpu")
    assert fused_trunk_supported(cpu, torch.bfloat16) and fused_trunk_supported(cpu, torch.float32)
    assert not fused_trunk_supported(cpu, torch.float64)  # the parity path stays unfused
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    taps = trunk.fast_features(x, dtype=torch.bfloat16, channels_last=True)
    assert type(taps[0].grad_fn).__name__ == "_FusedTrunkBackward"
    monkeypatch.setenv(FUSED_ENV, "0")
    assert not fused_trunk_supported(cpu, torch.bfloat16)
    taps = trunk.fast_features(x, dtype=torch.bfloat16, channels_last=True)
    assert type(taps[0].grad_fn).__name__ != "_FusedTrunkBackward"


def test_tuned_trunk_keeps_the_autograd_path():
    net = LatentVGG16BN(4, requires_grad=True).eval()
    x = torch.randn(1, 4, 8, 8)
    loss = sum(t.sum() for t in net.fast_features(x))  # auto: unfused, weights get gradients
    loss.backward()
    assert net.slice1[0].weight.grad is not None
    with pytest.raises(RuntimeError, match="fused=True"):
        net.fast_features(x, fused=True)
