"""The latent VGG16-BN trunk: layout, checkpoint mapping, BatchNorm folding, fast path."""
from __future__ import annotations

import copy

import pytest
import torch
from d2g_helpers import randomize_batchnorm

from d2g_fast.nn.latent_vgg import (
    SLICE_ENDS,
    TAP_CHANNELS,
    LatentVGG16BN,
    trunk_state_dict_from_classifier,
    trunk_state_dict_to_classifier,
)


@pytest.fixture(scope="module")
def trunk():
    torch.manual_seed(0)
    net = LatentVGG16BN(4)
    randomize_batchnorm(net)
    return net.eval()


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def test_layout_and_tap_shapes(trunk):
    layers = trunk.layers()
    assert len(layers) == SLICE_ENDS[-1] == 44
    pools = [i for i, m in enumerate(layers) if isinstance(m, torch.nn.MaxPool2d)]
    identities = [i for i, m in enumerate(layers) if isinstance(m, torch.nn.Identity)]
    assert pools == [33, 43] and identities == [6, 13, 23], (pools, identities)
    keys = list(trunk.state_dict())
    assert keys[0] == "slice1.0.weight" and "slice2.8.running_mean" in keys and "slice5.41.bias" in keys
    x = torch.randn(2, 4, 16, 12)
    with torch.no_grad():
        taps = trunk(x)
    shapes = [tuple(t.shape) for t in taps]
    assert shapes == [(2, c, h, w) for c, (h, w) in zip(TAP_CHANNELS, [(16, 12)] * 3 + [(8, 6), (4, 3)])], shapes


def test_classifier_checkpoint_mapping_round_trip(trunk):
    classifier = trunk_state_dict_to_classifier(trunk.state_dict())
    # The official checkpoint: DataParallel prefix plus the ImageNet classifier head.
    ckpt = {f"module.{k}": v for k, v in classifier.items()}
    ckpt["module.model.classifier.0.weight"] = torch.randn(8, 8)
    fresh = LatentVGG16BN(4)
    fresh.load_state_dict(trunk_state_dict_from_classifier(ckpt), strict=True)
    for (k, a), b in zip(trunk.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(KeyError, match="unexpected keys"):
        trunk_state_dict_from_classifier({"model.avgpool.weight": torch.zeros(1)})


@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_features_match_reference_fp32(trunk, channels_last):
    x = torch.randn(2, 4, 13, 11)
    with torch.no_grad():
        ref = trunk(x)
        fast = trunk.fast_features(x, channels_last=channels_last)
    for k, (a, b) in enumerate(zip(fast, ref)):
        err = max_rel_err(a, b)
        assert err < 2e-5, f"tap {k}: max rel err {err:.3g}"
        assert a.dtype == torch.float32
        if channels_last and a.shape[-1] > 1:
            assert a.is_contiguous(memory_format=torch.channels_last)


def test_fast_features_float64_input_gradient():
    torch.manual_seed(1)
    net = LatentVGG16BN(4)
    randomize_batchnorm(net, seed=1)
    net = net.double().eval()
    x = torch.randn(1, 4, 9, 8, dtype=torch.float64, requires_grad=True)
    proj = [torch.randn_like(t) for t in net(x)]
    ref = sum((t * p).sum() for t, p in zip(net(x), proj))
    (g_ref,) = torch.autograd.grad(ref, x)
    fast = sum((t * p).sum() for t, p in zip(net.fast_features(x, dtype=torch.float64), proj))
    (g_fast,) = torch.autograd.grad(fast, x)
    assert abs(fast.item() - ref.item()) < 1e-9 * abs(ref.item()), (fast.item(), ref.item())
    err = max_rel_err(g_fast, g_ref)
    assert err < 1e-10, f"input gradient max rel err {err:.3g}"


def test_tuned_trunk_gets_parameter_gradients_through_the_fold():
    torch.manual_seed(2)
    net = LatentVGG16BN(4, requires_grad=True)
    randomize_batchnorm(net, seed=2)
    net = net.double().eval()
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    loss_ref = sum(t.square().mean() for t in net(x))
    grads_ref = torch.autograd.grad(loss_ref, list(net.parameters()))
    loss_fast = sum(t.square().mean() for t in net.fast_features(x, dtype=torch.float64))
    grads_fast = torch.autograd.grad(loss_fast, list(net.parameters()))
    for (name, _), a, b in zip(net.named_parameters(), grads_fast, grads_ref):
        err = max_rel_err(a, b)
        assert err < 1e-8, f"{name}: max rel err {err:.3g}"


def test_fold_cache_follows_in_place_weight_changes(trunk):
    net = copy.deepcopy(trunk)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        before = net.fast_features(x)[0]
        net.slice1[1].running_mean.add_(0.5)  # an in-place change of a BN buffer
        after = net.fast_features(x)[0]
        ref = net(x)[0]
    assert not torch.allclose(before, after)
    err = max_rel_err(after, ref)
    assert err < 2e-5, f"stale fold cache: max rel err {err:.3g}"


def test_bf16_fast_features_close_to_fp32(trunk):
    x = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        ref = trunk(x)
        fast = trunk.fast_features(x, dtype=torch.bfloat16, channels_last=True)
    for k, (a, b) in enumerate(zip(fast, ref)):
        assert a.dtype == torch.bfloat16
        rel = ((a.double() - b.double()).norm() / b.double().norm()).item()
        assert rel < 5e-2, f"tap {k}: relative L2 error {rel:.3g}"


def test_fast_features_refuse_train_mode():
    net = LatentVGG16BN(4).train()
    with pytest.raises(RuntimeError, match="eval mode"):
        net.fast_features(torch.randn(1, 4, 8, 8))


def test_bad_channel_count_argument():
    with pytest.raises(ValueError, match="in_channels"):
        LatentVGG16BN(0)
