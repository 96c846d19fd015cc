"""d2g_fast.ELatentLPIPS on its own: fast path vs reference path, gradients, bf16, checkpoints,
negative heads, bad input, torch.compile, the functional form, the reconstruction experiment.

Parity with the official package lives in tests/test_elatentlpips_parity.py."""
from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from d2g_helpers import one_thread, randomize_batchnorm

from d2g_fast import ELatentLPIPS
from d2g_fast.functional import e_latent_lpips
from d2g_fast.nn.elatentlpips import heads_filename, trunk_filename
from d2g_fast.nn.latent_vgg import trunk_state_dict_to_classifier


def make_model(encoder="sd15", seed=0, **kwargs) -> ELatentLPIPS:
    torch.manual_seed(seed)
    kwargs.setdefault("augment", None)
    model = ELatentLPIPS(pretrained=False, pnet_rand=True, encoder=encoder, verbose=False, **kwargs)
    randomize_batchnorm(model.net, seed)
    return model


@pytest.fixture(scope="module")
def model4():
    return make_model("sd15")


def latents(n=2, c=4, h=12, w=10, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g, dtype=dtype), torch.randn(n, c, h, w, generator=g, dtype=dtype)


def loss_and_grad(model, x, y, **kw):
    x = x.detach().clone().requires_grad_(True)
    out = model(x, y, ensembling=False, **kw)
    (out * torch.linspace(0.5, 1.5, out.numel(), device=out.device).view_as(out)).sum().backward()
    return out.detach(), x.grad


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def norm_rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def test_output_shapes(model4):
    x, y = latents(2, 4, 12, 10)
    with torch.no_grad():
        assert model4(x, y, ensembling=False).shape == (2, 1, 1, 1)
        val, layers = model4(x, y, retPerLayer=True, ensembling=False)
        assert val.shape == (2, 1, 1, 1) and [tuple(r.shape) for r in layers] == [(2, 1, 1, 1)] * 5
        spatial = copy.deepcopy(model4)
        spatial.spatial = True
        val, layers = spatial(x, y, retPerLayer=True, ensembling=False)
        assert val.shape == (2, 1, 12, 10) and all(tuple(r.shape) == (2, 1, 12, 10) for r in layers)
        assert (val > 0).all()


@pytest.mark.parametrize("encoder,kw,model_kw", [
    ("sd15", {}, {}),
    ("sd15", {"normalize": True, "add_l1_loss": False}, {}),
    ("sdxl", {"normalize": True}, {"spatial": True}),
    ("sd3", {"normalize": True, "add_l1_loss": False}, {"channels_last": True}),
    ("flux", {}, {"elatentlpips": False}),
])
def test_fast_path_matches_reference_path(encoder, kw, model_kw):
    """Oracle: the reference path (BatchNorm unfolded, distances op by op) in float64.
    The fast path in float64 must agree to rounding; in float32 the loss to 1e-5 and the input
    gradient to 1e-4 in norm (float32 conditioning of the unit normalisation; the reference
    path itself is 10x further from the float64 gradient, see the parity tests)."""
    model = make_model(encoder, **model_kw)
    model64 = copy.deepcopy(model).double()
    x, y = latents(2, model.latent_channels, 11, 13, seed=3)
    model64.impl = "ref"
    ref, g_ref = loss_and_grad(model64, x.double(), y.double(), **kw)
    model64.impl = "auto"
    fast64, g_fast64 = loss_and_grad(model64, x.double(), y.double(), **kw)
    assert rel_err(fast64, ref) < 1e-10, f"float64 loss max rel err {rel_err(fast64, ref):.3g}"
    assert rel_err(g_fast64, g_ref) < 1e-9, f"float64 grad max rel err {rel_err(g_fast64, g_ref):.3g}"
    fast, g_fast = loss_and_grad(model, x, y, **kw)
    assert rel_err(fast, ref) < 1e-5, f"float32 loss max rel err {rel_err(fast, ref):.3g}"
    err = norm_rel_err(g_fast, g_ref)
    assert err < 1e-4, f"float32 grad relative L2 err {err:.3g}"


def test_gradcheck_float64_both_inputs():
    model = make_model("sd15").double()
    x, y = latents(1, 4, 4, 4, seed=5, dtype=torch.float64)
    x.requires_grad_(True)
    y.requires_grad_(True)
    fn = lambda a, b: model(a, b, ensembling=False, normalize=True)  # noqa: E731
    # fast_mode: a random projection of the Jacobian (a full one costs minutes here).
    assert torch.autograd.gradcheck(fn, (x, y), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def _saved_bytes(model, x, y) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, y, ensembling=False)
    return total


def test_target_branch_runs_without_autograd(model4):
    x, y = latents(1, 4, 16, 16, seed=7)
    x.requires_grad_(True)
    one_branch = _saved_bytes(model4, x, y)
    both = _saved_bytes(model4, x, y.clone().requires_grad_(True))
    # The target branch saves nothing when it needs no gradient: about half the activations.
    assert one_branch < 0.6 * both, (one_branch, both)
    # ... and a target that does require grad still gets the right gradient.
    y1 = y.clone().requires_grad_(True)
    model4(x, y1, ensembling=False).sum().backward()
    model4.impl = "ref"
    try:
        y2 = y.clone().requires_grad_(True)
        model4(x, y2, ensembling=False).sum().backward()
    finally:
        model4.impl = "auto"
    assert rel_err(y1.grad, y2.grad) < 1e-4, f"target grad max rel err {rel_err(y1.grad, y2.grad):.3g}"


def test_bf16_within_tolerance_of_fp32():
    model = make_model("sd15")
    x, y = latents(2, 4, 32, 32, seed=9)
    y = x + 0.5 * y  # a realistic "prediction near target" pair
    with torch.no_grad():
        ref = model(x, y, ensembling=False, add_l1_loss=False)
        model.precision = "bf16"
        fast = model(x, y, ensembling=False, add_l1_loss=False)
    assert fast.dtype == torch.float32
    err = ((fast - ref).abs() / ref.abs()).max().item()
    assert err < 2e-2, f"bf16 vs fp32 max rel err {err:.3g}"


@pytest.mark.parametrize("case,exc,match", [
    ("shape", ValueError, "in0 and in1 must have the same shape"),
    ("channels", ValueError, "in0 has 3 channels but encoder 'sd15' latents have 4"),
    ("nan0", ValueError, "in0 contains NaN"),
    ("inf1", ValueError, "in1 contains NaN or Inf"),
    ("int", TypeError, "in0 must be a floating-point tensor"),
    ("ndim", ValueError, "in1 must be a 4-D latent batch"),
    ("list", TypeError, "in0 must be a torch.Tensor"),
    ("small", ValueError, "in0 must have N >= 1 and H, W >= 4"),
])
def test_bad_input_names_the_argument(model4, case, exc, match):
    x, y = latents(1, 4, 8, 8)
    if case == "shape":
        y = y[:, :, :7]
    elif case == "channels":
        x, y = x[:, :3], y[:, :3]
    elif case == "nan0":
        x[0, 1, 2, 3] = float("nan")
    elif case == "inf1":
        y[0, 0, 0, 0] = float("inf")
    elif case == "int":
        x = x.long()
    elif case == "ndim":
        y = y[0]
    elif case == "list":
        x = x.tolist()
    elif case == "small":
        x, y = x[:, :, :3], y[:, :, :3]
    with pytest.raises(exc, match=match):
        model4(x, y, ensembling=False)


def test_bad_constructor_arguments_name_the_argument():
    for kwargs, match in [({"encoder": "sd4"}, "encoder must be one of"),
                          ({"augment": "x"}, "augment must be None or one of"),
                          ({"precision": "fp16"}, "precision must be one of"),
                          ({"negative_weights": "keep"}, "negative_weights must be one of"),
                          ({"impl": "fast"}, "impl must be one of"),
                          ({"augment_sampler": "gpu"}, "augment_sampler must be one of")]:
        with pytest.raises(ValueError, match=match):
            ELatentLPIPS(pretrained=False, pnet_rand=True, verbose=False, **kwargs)
    with pytest.raises(NotImplementedError, match="net='alex'"):
        ELatentLPIPS(pretrained=False, pnet_rand=True, verbose=False, net="alex")


def test_device_drawn_augmentation_on_cpu_is_seeded_and_random():
    """augment_sampler="device" draws with the sampler op (the CPU kernel here): reproducible from
    torch.manual_seed, a new augmentation per call, and the default "host" sampler unaffected."""
    model = make_model("sd15", augment="bg", augment_sampler="device")
    assert model.augment.sampler == "device"
    x, y = latents(2, 4, 16, 16, seed=41)
    torch.manual_seed(7)
    a = model(x, y)
    b = model(x, y)
    torch.manual_seed(7)
    a_again = model(x, y)
    assert torch.equal(a, a_again), "torch.manual_seed must reproduce the device-drawn augmentation"
    assert not torch.equal(a, b), "two calls drew the same augmentation"
    assert make_model("sd15", augment="bg").augment.sampler == "auto"


def test_ensembling_without_augmentation_raises(model4):
    x, y = latents(1, 4, 8, 8)
    with pytest.raises(ValueError, match="ensembling=True needs an augmentation"):
        model4(x, y)


def test_pretrained_without_files_says_which_file_and_where(monkeypatch, tmp_path):
    monkeypatch.delenv("D2G_ELATENTLPIPS_DIR", raising=False)
    with pytest.raises(FileNotFoundError) as info:
        ELatentLPIPS(encoder="sdxl", augment=None, verbose=False)
    msg = str(info.value)
    assert heads_filename("sdxl") in msg and "'sdxl'" in msg and "huggingface.co" in msg
    assert "D2G_ELATENTLPIPS_DIR" in msg and "heads_path" in msg
    monkeypatch.setenv("D2G_ELATENTLPIPS_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / heads_filename("sdxl"))):
        ELatentLPIPS(encoder="sdxl", augment=None, verbose=False)
    with pytest.raises(FileNotFoundError, match=trunk_filename("sd3")):
        ELatentLPIPS(pretrained=False, encoder="sd3", augment=None, verbose=False)


def _official_layout_state_dict(model):
    # What the official tuned file holds: net.*, lin<k>.model.1.weight and lins.<k>.model.1.weight.
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_official_checkpoint_files_load(model4, tmp_path, monkeypatch):
    x, y = latents(1, 4, 8, 8, seed=11)
    with torch.no_grad():
        expected = model4(x, y, ensembling=False)
    tuned = tmp_path / heads_filename("sd15")
    torch.save(_official_layout_state_dict(model4), tuned)
    by_path = ELatentLPIPS(encoder="sd15", augment=None, verbose=False, heads_path=tuned)
    monkeypatch.setenv("D2G_ELATENTLPIPS_DIR", str(tmp_path))
    by_env = ELatentLPIPS(encoder="sd15", augment=None, verbose=False)
    with torch.no_grad():
        for m in (by_path, by_env):
            err = (m(x, y, ensembling=False) - expected).abs().max().item()
            assert err == 0.0, f"loaded model differs by {err:.3g}"

    # The ImageNet trunk file: {"state_dict": module.model.features.*, classifier, "best_acc1"}.
    trunk_sd = {f"module.{k}": v for k, v in trunk_state_dict_to_classifier(model4.net.state_dict()).items()}
    trunk_sd["module.model.classifier.6.bias"] = torch.zeros(1000)
    trunk_file = tmp_path / trunk_filename("sd15")
    torch.save({"state_dict": trunk_sd, "best_acc1": torch.tensor(69.5), "epoch": 90}, trunk_file)
    trunk_only = ELatentLPIPS(pretrained=False, encoder="sd15", augment=None, verbose=False,
                              trunk_path=trunk_file)
    for (k, a), b in zip(model4.net.state_dict().items(), trunk_only.net.state_dict().values()):
        assert torch.equal(a, b), k


class _NotATensor:
    pass


def test_checkpoints_are_read_with_weights_only(model4, tmp_path):
    bad = tmp_path / "evil_tuned.pth"
    payload = _official_layout_state_dict(model4)
    payload["extra"] = _NotATensor()  # an arbitrary object: a full unpickle would run code here
    torch.save(payload, bad)
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|not an allowed global"):
        ELatentLPIPS(encoder="sd15", augment=None, verbose=False, heads_path=bad)


def test_safetensors_round_trip(model4, tmp_path):
    path = tmp_path / "sd15.safetensors"
    model4.save_safetensors(path)
    loaded = ELatentLPIPS.from_safetensors(path, augment=None)
    assert loaded.encoder == "sd15"
    for (k, a), b in zip(model4.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    # heads_path accepts our safetensors too.
    again = ELatentLPIPS(encoder="sd15", augment=None, verbose=False, heads_path=path)
    assert torch.equal(again.lin3.weight, model4.lin3.weight)
    from safetensors.torch import save_file
    other = tmp_path / "other.safetensors"
    save_file({"a": torch.zeros(1)}, str(other))
    with pytest.raises(ValueError, match="not a d2g_fast E-LatentLPIPS safetensors file"):
        loaded.load_safetensors(other)


def test_negative_head_weights_are_clamped_or_rejected(model4):
    sd = _official_layout_state_dict(model4)
    for prefix in ("lin2", "lins.2"):
        sd[f"{prefix}.model.1.weight"][0, :7] = -0.25
    clamping = make_model("sd15")
    with pytest.warns(UserWarning, match=r"clamped 7 negative linear-head weights to zero \(lin2: 7\)"):
        clamping.load_state_dict(sd)
    assert (clamping.lin2.weight >= 0).all() and (clamping.lin2.weight[0, :7] == 0).all()
    assert clamping.lins[2].weight is clamping.lin2.weight
    x, y = latents(2, 4, 8, 8)
    with torch.no_grad():
        assert (clamping(x, y, ensembling=False, add_l1_loss=False, retPerLayer=True)[1][2] >= 0).all()
    rejecting = make_model("sd15", negative_weights="error")
    with pytest.raises(ValueError, match="7 negative linear-head weights"):
        rejecting.load_state_dict(sd)


def test_head_layout_without_dropout_loads_official_files(model4):
    sd = _official_layout_state_dict(model4)  # model.1 = conv after dropout
    plain = make_model("sd15", use_dropout=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain.load_official_state_dict(sd)
    assert torch.equal(plain.lin4.model[0].weight, model4.lin4.model[1].weight)


def test_train_mode_dropout_uses_reference_heads(model4):
    model = copy.deepcopy(model4).train()
    model.net.eval()
    x, y = latents(2, 4, 8, 8)
    torch.manual_seed(0)
    a = model(x, y, ensembling=False, add_l1_loss=False)
    torch.manual_seed(1)
    b = model(x, y, ensembling=False, add_l1_loss=False)
    assert not torch.allclose(a, b), "dropout before the heads should be active in train mode"


def test_torch_compile_matches_eager(model4):
    # aot_eager traces the module and the op's fake/autograd registrations; inductor on the CPU
    # compiles for a minute here, so inductor is tested on the GPU (test_cuda_torch_compile_...).
    x, y = latents(2, 4, 8, 8, seed=13)
    eager, g_eager = loss_and_grad(model4, x, y)
    compiled = torch.compile(model4, backend="aot_eager", fullgraph=False)
    got, g_got = loss_and_grad(compiled, x, y)
    assert rel_err(got, eager) < 1e-6 and rel_err(g_got, g_eager) < 1e-5


def test_functional_form(model4):
    x, y = latents(3, 4, 8, 8)
    with torch.no_grad():
        per = e_latent_lpips(x, y, model4, reduction="none")
        mean = e_latent_lpips(x, y, model4)
        full = model4(x, y, ensembling=False)
    assert per.shape == (3,) and torch.equal(per, full.view(-1))
    assert torch.allclose(mean, full.mean())
    with pytest.raises(TypeError, match="model must be a d2g_fast.ELatentLPIPS"):
        e_latent_lpips(x, y, torch.nn.Identity())
    with pytest.raises(ValueError, match="reduction must be one of"):
        e_latent_lpips(x, y, model4, reduction="max")


def test_augmentation_is_applied_identically_to_both_inputs():
    model = make_model("sd15", augment="bgc")
    x, y = latents(2, 4, 12, 12, seed=17)
    with torch.no_grad():
        # Identical inputs stay at distance zero under any shared transform.
        assert model(x, x.clone(), add_l1_loss=False).abs().max().item() < 1e-6
        got = model(x, y, debug_percentile=0.3, add_l1_loss=False)
        xa, ya = model.augment(x, y, debug_percentile=0.3)
        want = model(xa, ya, ensembling=False, add_l1_loss=False)
    assert rel_err(got, want) < 1e-6


RECONSTRUCTION_TRUNK_SEEDS = (0, 1, 2)


def _reconstruction_error(trunk_seed: int, augment, start, target, steps: int = 20) -> float:
    """Mean squared distance to ``target`` after ``steps`` Adam steps on the E-LatentLPIPS
    loss from ``start``, with a random trunk drawn from ``trunk_seed``."""
    torch.manual_seed(trunk_seed)
    model = ELatentLPIPS(pretrained=False, pnet_rand=True, encoder="sd15", augment=augment,
                         verbose=False)
    x = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.05)
    torch.manual_seed(1)  # the augmentation draws
    for _ in range(steps):
        loss = model(x, target, ensembling=augment is not None, add_l1_loss=False).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (x.detach() - target).square().mean().item()


def test_single_latent_reconstruction_ensembling_helps():
    """The paper's reconstruction experiment in small: optimise a latent towards a target; with
    augmentation ensembling it ends closer to the target in plain L2.

    What it proves: on each of several random trunks (torchvision initialisation, BatchNorm at
    its initial statistics; not the trained metric), ensembling changes the optimisation the
    way the paper describes: every trunk must improve on the start, ensembling must beat the
    plain loss on every trunk, and on average by a margin (3%), so that a rounding change cannot
    flip the outcome; one seed alone would prove little."""
    g = torch.Generator().manual_seed(123)
    target = torch.nn.functional.avg_pool2d(torch.randn(1, 4, 12, 12, generator=g), 3, 1, 1) * 2
    start = torch.randn(1, 4, 12, 12, generator=g)
    initial = (start - target).square().mean().item()
    ratios = []
    with one_thread():
        for seed in RECONSTRUCTION_TRUNK_SEEDS:
            plain = _reconstruction_error(seed, None, start, target)
            ensembled = _reconstruction_error(seed, "bg", start, target)
            assert ensembled < plain < initial, (seed, initial, plain, ensembled)
            ratios.append(ensembled / plain)
    mean_ratio = sum(ratios) / len(ratios)
    assert mean_ratio < 0.97, f"ensembled / plain error per trunk {ratios}: mean {mean_ratio:.3f}"


def test_heads_frozen_in_eval_mode_and_trainable_for_calibration():
    frozen = make_model("sd15")
    assert not any(p.requires_grad for p in frozen.lins.parameters())
    assert not any(p.requires_grad for p in frozen.net.parameters())
    calibrating = make_model("sd15", eval_mode=False)
    assert all(p.requires_grad for p in calibrating.lins.parameters())
    calibrating.eval()  # BN running stats, heads still trainable: gradients reach the heads
    x, y = latents(2, 4, 8, 8)
    calibrating(x, y, ensembling=False).sum().backward()
    for k, lin in enumerate(calibrating.lins):
        assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0, k


# ---------------------------------------------------------------------------------- GPU
def _cuda_model(**kwargs):
    return make_model("sd15", **kwargs).cuda()


@pytest.fixture(autouse=False)
def strict_fp32():
    """cuDNN convs default to TF32 on Ampere+; fp32 comparisons need true fp32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.cuda
@pytest.mark.parametrize("spatial", [False, True])
def test_cuda_fast_path_matches_reference_and_bf16(spatial, strict_fp32):
    model = _cuda_model(spatial=spatial)
    x, y = latents(4, 4, 64, 64, seed=21)
    x, y = x.cuda(), (x + 0.5 * y).cuda()
    model.impl = "ref"
    ref, g_ref = loss_and_grad(model, x, y)
    model.impl = "auto"
    fast, g_fast = loss_and_grad(model, x, y)
    # cuDNN picks different conv algorithms for the folded and unfolded trunks.
    assert rel_err(fast, ref) < 1e-4, f"fp32 loss max rel err {rel_err(fast, ref):.3g}"
    assert norm_rel_err(g_fast, g_ref) < 1e-3, f"fp32 grad rel L2 err {norm_rel_err(g_fast, g_ref):.3g}"
    model.precision = "bf16"
    bf, _ = loss_and_grad(model, x, y)
    err = ((bf - fast).abs() / fast.abs().clamp_min(1e-6)).max().item()
    assert err < 2e-2, f"bf16 vs fp32 max rel err {err:.3g}"


@pytest.mark.cuda
def test_cuda_torch_compile_matches_eager():
    model = _cuda_model(precision="bf16")
    x, y = (t.cuda() for t in latents(2, 4, 32, 32, seed=23))
    eager, g_eager = loss_and_grad(model, x, y)
    compiled = torch.compile(model)
    got, g_got = loss_and_grad(compiled, x, y)
    assert rel_err(got, eager) < 1e-2 and norm_rel_err(g_got, g_eager) < 2e-2


@pytest.mark.cuda
def test_cuda_graph_capture_static_shapes():
    model = _cuda_model(precision="bf16")
    x0, y0 = (t.cuda() for t in latents(2, 4, 32, 32, seed=25))
    x1, y1 = (t.cuda() for t in latents(2, 4, 32, 32, seed=26))
    x = x0.clone().requires_grad_(True)
    y = y0.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: fold cache, cuDNN plans, allocator pools
        for _ in range(3):
            x.grad = None
            model(x, y, ensembling=False).sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = model(x, y, ensembling=False)
        out.sum().backward()
    with torch.no_grad():
        x.copy_(x1)
        y.copy_(y1)
    graph.replay()
    torch.cuda.synchronize()
    x_eager = x1.clone().requires_grad_(True)
    want = model(x_eager, y1, ensembling=False)
    want.sum().backward()
    g_want = x_eager.grad
    assert rel_err(out.detach(), want) < 1e-5, f"replayed loss max rel err {rel_err(out.detach(), want):.3g}"
    assert rel_err(x.grad, g_want) < 1e-4


@pytest.mark.parametrize("augment_sampler", ["host", "device"])
def test_augmented_target_branch_runs_without_autograd(monkeypatch, augment_sampler):
    """With augmentation, the target latent (no gradient) must still take the trunk without
    autograd: the augmentation op's outputs must not hand it a requires_grad flag."""
    model = make_model("sd15", augment="bg", augment_sampler=augment_sampler, precision="bf16")
    seen = []
    original = model.net.fast_features

    def recording(x, *args, **kwargs):
        seen.append((x.requires_grad, torch.is_grad_enabled()))
        return original(x, *args, **kwargs)

    monkeypatch.setattr(model.net, "fast_features", recording)
    x, y = latents(2, 4, 16, 16, seed=43)
    x.requires_grad_(True)
    model(x, y).sum().backward()
    assert len(seen) == 2, seen
    assert seen[0] == (True, True), f"generated branch: {seen[0]}"
    assert seen[1] == (False, False), f"target branch ran with autograd: {seen[1]}"
    assert x.grad is not None and x.grad.abs().sum() > 0
