"""Fused multi-scale discriminator heads: the saved per-pixel stats (the one-pass backward's
m1, m2), the block shapes chosen per head (Triton channel split here, CUDA pixels x channel
groups on a GPU), many heads in one call, low-precision dtypes, and no host synchronisation."""
import pytest
import torch
import torch.nn.functional as F

from d2g_asserts import assert_close
from d2g_fast import _ext
from d2g_fast.ops import multiscale_heads
from d2g_fast.ref.multiscale_heads import multiscale_heads as heads_ref
from test_multiscale_heads import make_inputs

needs_ext = pytest.mark.skipif(not _ext.ext_loaded(), reason=f"no extension: {_ext.ext_error()}")
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Every layout the CUDA kernel chooses between: a 1x1 map (one pixel per block, all threads on
# channels), a 7x5 map (a block wider than the map), 8x8 with 2560 channels (16 channel groups),
# 64x64 with few and with many channels (many pixels per block), a map wider than a block with a
# partial last tile, and a tiny head.
GPU_SHAPES = [(2560, 8, 8), (7, 1, 1), (300, 1, 1), (96, 7, 5), (4, 64, 64), (40, 64, 64),
              (1280, 16, 16), (33, 3, 50), (3, 2, 2)]
# Largest error allowed relative to the largest reference value, per feature dtype (features in
# bf16/fp16 are read exactly and accumulated in fp32; only the gradient store rounds).
REL_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def assert_close_scaled(actual, expected, rel, name):
    """max |actual - expected| <= rel * max |expected| (elementwise atol would be meaningless for
    gradients of 1e-6 and losses of 1)."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{name}: non-finite values (an unwritten output?)"
    scale = e.abs().max().item()
    err = (a - e).abs().max().item()
    if scale == 0:  # e.g. the feature gradient of a one-channel head (its LayerNorm output is 0)
        assert err <= 1e-12, f"{name}: max abs err {err:.3e} where the reference is all zero"
        return
    assert err <= rel * scale, f"{name}: max abs err {err:.3e} > {rel:g} * max |ref| {scale:.3e}"


def expected_stats(features, weights, bias, eps=1e-5):
    """(5, N, H, W) per head from the definition: logit, mean, rstd, m1, m2 (float64)."""
    out = []
    for k, (f, w) in enumerate(zip(features, weights)):
        x = f.detach().double()
        mean = x.mean(1)
        rstd = 1 / torch.sqrt(x.var(1, unbiased=False) + eps)
        xhat = (x - mean[:, None]) * rstd[:, None]
        s = torch.sigmoid(xhat)
        w_dsilu = w.double().view(1, -1, 1, 1) * s * (1 + xhat * (1 - s))
        logit = (w.double().view(1, -1, 1, 1) * F.silu(xhat)).sum(1) + bias[k].double()
        out.append(torch.stack([logit, mean, rstd, w_dsilu.mean(1), (w_dsilu * xhat).mean(1)]))
    return out


def check_stats(op, device, shapes):
    feats, ws, bias, target, hw = make_inputs(n=3, shapes=shapes, device=device)
    hw = [1.0] * len(shapes)
    _loss, _scores, stats = op(feats, ws, bias, target, hw, 1e-5)
    for k, (got, want) in enumerate(zip(stats, expected_stats(feats, ws, bias))):
        for row, name in enumerate(["logit", "mean", "rstd", "m1", "m2"]):
            assert_close(got[row], want[row], atol=2e-5, rtol=2e-5, name=f"head {k} stats {name}")


def check_against_reference(impl, device, shapes, n=3, dtype=torch.float32, layout="contiguous"):
    feats, ws, bias, target, hw = make_inputs(n=n, shapes=shapes, dtype=dtype, device=device,
                                              layout=layout)
    hw = [0.5 + 0.1 * k for k in range(len(shapes))]
    leaves = feats + ws + [bias]
    for t in leaves:
        t.requires_grad_(True)
    loss, scores = multiscale_heads(feats, ws, bias, target, hw, impl=impl)
    r_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    k = len(shapes)
    rloss, rscores = heads_ref(r_leaves[:k], r_leaves[k:2 * k], r_leaves[2 * k], target.double(), hw)
    rel = REL_TOL[dtype]
    fwd_rel = min(rel, 2e-5) if dtype != torch.float64 else rel
    assert_close_scaled(loss, rloss, fwd_rel, f"{impl} {dtype} {layout} loss")
    assert_close_scaled(scores, rscores, fwd_rel, f"{impl} {dtype} {layout} scores")
    g_scores = torch.randn(scores.shape, generator=torch.Generator().manual_seed(5)).to(device)
    grads = torch.autograd.grad((loss, scores), leaves, (torch.tensor(0.7, device=device), g_scores))
    rgrads = torch.autograd.grad((rloss, rscores), r_leaves,
                                 (torch.tensor(0.7, dtype=torch.float64, device=device),
                                  g_scores.double()))
    for i, (g, r) in enumerate(zip(grads, rgrads)):
        what = f"features[{i}]" if i < k else (f"weights[{i - k}]" if i < 2 * k else "bias")
        # Weight and bias gradients are accumulated in fp32 whatever the feature dtype.
        tol = rel if i < k else fwd_rel * 5
        assert_close_scaled(g, r, tol, f"{impl} {dtype} {layout} grad {what}")


# ------------------------------------------------------------------------------- CPU / Triton
@needs_ext
def test_cpu_stats_hold_the_backward_channel_means():
    check_stats(torch.ops.d2g_fast.multiscale_heads, "cpu", [(5, 7, 9), (70, 9, 8), (3, 1, 1)])


@pytest.mark.triton
def test_triton_stats_hold_the_backward_channel_means():
    check_stats(torch.ops.d2g_fast.multiscale_heads_triton, TRITON_DEVICE,
                [(5, 7, 9), (70, 9, 8), (3, 1, 1)])


def test_triton_block_shapes_split_the_channels_of_small_maps():
    pytest.importorskip("triton")
    from d2g_fast.triton.multiscale_heads import MAX_SLICES, _blocks
    assert _blocks(2560, 64) == (128, 16)  # 8x8: 4x the programs of a 64-pixel tile
    assert _blocks(960, 4096) == (32, 64)  # 64x64: wide pixel tiles, unchanged
    for C, HW in [(2560, 64), (1280, 256), (4, 4096), (3, 1), (7000, 35), (2100, 64)]:
        block_c, block_p = _blocks(C, HW)
        assert block_c * block_p <= 4096 and block_p >= 16, (C, HW, block_c, block_p)
        assert block_p == 16 or -(-C // block_c) <= MAX_SLICES, (C, HW, block_c, block_p)


@pytest.mark.triton
def test_triton_split_channels_match_reference():
    # 8x8 with 2100 channels takes the narrowed tile (16 pixels x 128 channels, 17 slices with a
    # partial last one); one sample keeps the interpreter quick.
    check_against_reference("triton", TRITON_DEVICE, [(2100, 8, 8), (6, 3, 5)], n=1)


@needs_ext
def test_cpu_many_heads_and_odd_batch_match_reference():
    g = torch.Generator().manual_seed(7)
    shapes = [(int(torch.randint(1, 40, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g)),
               int(torch.randint(1, 6, (1,), generator=g))) for _ in range(27)]
    check_against_reference("cpu", "cpu", shapes, n=5)


# ------------------------------------------------------------------------------------- GPU
@pytest.mark.cuda
def test_cuda_stats_hold_the_backward_channel_means():
    check_stats(torch.ops.d2g_fast.multiscale_heads, "cuda", GPU_SHAPES)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous"])
def test_cuda_block_layouts_match_reference(dtype, layout):
    check_against_reference("cuda", "cuda", GPU_SHAPES, n=3, dtype=dtype, layout=layout)


@pytest.mark.cuda
@pytest.mark.triton
def test_triton_gpu_block_layouts_match_reference():
    # fp32 only: other dtypes are in test_multiscale_heads.py, and every block shape costs a JIT
    # compile in the time-boxed GPU check.
    check_against_reference("triton", "cuda", GPU_SHAPES, n=3)


@pytest.mark.cuda
def test_cuda_more_heads_than_one_launch_holds():
    # The CUDA kernel takes 24 heads per launch: 27 heads take two, sharing the finishing sums.
    g = torch.Generator().manual_seed(7)
    shapes = [(int(torch.randint(1, 600, (1,), generator=g)), int(torch.randint(1, 20, (1,), generator=g)),
               int(torch.randint(1, 20, (1,), generator=g))) for _ in range(27)]
    check_against_reference("cuda", "cuda", shapes, n=5)


@pytest.mark.cuda
def test_cuda_is_deterministic():
    feats, ws, bias, target, hw = make_inputs(n=3, shapes=GPU_SHAPES, device="cuda")
    hw = [1.0] * len(GPU_SHAPES)
    leaves = feats + ws + [bias]
    for t in leaves:
        t.requires_grad_(True)
    runs = []
    for _ in range(2):
        loss, scores = multiscale_heads(feats, ws, bias, target, hw, impl="cuda")
        runs.append([loss, scores] + list(torch.autograd.grad(loss + scores.sum(), leaves)))
    for i, (a, b) in enumerate(zip(*runs)):
        assert torch.equal(a, b), f"output {i} differs between two identical calls"


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["cuda", "triton"])
def test_gpu_forward_and_backward_never_synchronise(impl):
    feats, ws, bias, target, hw = make_inputs(n=3, shapes=GPU_SHAPES, device="cuda")
    leaves = feats + ws + [bias]
    for t in leaves:
        t.requires_grad_(True)

    def step():
        loss, scores = multiscale_heads(feats, ws, bias, target, hw[:1] * len(feats), impl=impl)
        return torch.autograd.grad(loss + scores.sum(), leaves)

    step()  # compile / load the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.parametrize("impl", ["cpu", "ref"])
def test_gradients_only_for_inputs_that_require_them(impl):
    """Frozen heads and detached taps get no gradient (per list element: torch.library passes
    needs_input_grad of a Tensor[] input as one bool per element), the others the right one."""
    feats, ws, bias, target, _ = make_inputs(n=3)
    k = len(feats)
    hw = [1.0 / k] * k
    need_f = [i % 2 == 0 for i in range(k)]
    need_w = [i % 2 == 1 for i in range(k)]
    feats = [f.clone().requires_grad_(n) for f, n in zip(feats, need_f)]
    ws = [w.clone().requires_grad_(n) for w, n in zip(ws, need_w)]
    loss, _ = multiscale_heads(feats, ws, bias, target, hw, impl=impl)
    loss.backward()
    ref_feats = [f.detach().double().requires_grad_(True) for f in feats]
    ref_ws = [w.detach().double().requires_grad_(True) for w in ws]
    ref_loss, _ = multiscale_heads(ref_feats, ref_ws, bias.double(), target.double(), hw, impl="ref")
    ref_loss.backward()
    for i in range(k):
        if need_f[i]:
            assert_close_scaled(feats[i].grad, ref_feats[i].grad, 2e-5, f"grad features[{i}]")
        else:
            assert feats[i].grad is None, f"features[{i}] does not require grad but got one"
        if need_w[i]:
            assert_close_scaled(ws[i].grad, ref_ws[i].grad, 2e-5, f"grad weights[{i}]")
        else:
            assert ws[i].grad is None, f"weights[{i}] does not require grad but got one"
