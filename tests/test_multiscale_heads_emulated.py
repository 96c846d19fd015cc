"""The CUDA kernels of the fused heads (csrc/multiscale_heads/cuda/), run on the CPU through
tools/cuda_emu (one thread per CUDA thread, real barriers and warp-shuffle exchange): their
block layouts, shared-memory reductions, head tables and launch code against the reference, on
machines without a GPU. Builds a small extension first (about 30 s on 2 cores)."""
import pytest
import torch
from d2g_helpers import emulated_ops

from d2g_fast.ref.multiscale_heads import multiscale_heads as heads_ref
from test_multiscale_heads import make_inputs
from test_multiscale_heads_layouts import GPU_SHAPES, REL_TOL, assert_close_scaled, expected_stats

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def heads_ops(tmp_path_factory):
    return emulated_ops(tmp_path_factory, "multiscale_heads/cuda/multiscale_heads_kernel.cu",
                        "d2g_emu_multiscale_heads", ["multiscale_heads/multiscale_heads.cpp"])


def check(ops, shapes, n, dtype=torch.float32, layout="contiguous", name=""):
    feats, ws, bias, target, _ = make_inputs(n=n, shapes=shapes, dtype=dtype, layout=layout)
    hw = [0.5 + 0.1 * k for k in range(len(shapes))]
    loss, scores, stats = ops.multiscale_heads(feats, ws, bias, target, hw, 1e-5)
    k = len(shapes)
    r = [t.detach().double().requires_grad_(True) for t in feats + ws + [bias]]
    rloss, rscores = heads_ref(r[:k], r[k:2 * k], r[2 * k], target.double(), hw)
    rel = REL_TOL[dtype]
    frel = 1e-10 if dtype == torch.float64 else 2e-5
    assert_close_scaled(loss, rloss, frel, f"{name} loss")
    assert_close_scaled(scores, rscores, frel, f"{name} scores")
    for i, (got, want) in enumerate(zip(stats, expected_stats(feats, ws, bias))):
        assert_close_scaled(got, want, 5 * frel, f"{name} stats[{i}]")
    gl = torch.tensor(0.7, dtype=stats[0].dtype)
    gs = torch.randn(scores.shape, generator=torch.Generator().manual_seed(5)).to(stats[0].dtype)
    gf, gw, gb = ops.multiscale_heads_backward(gl, gs, feats, ws, target, hw, 1e-5, stats)
    rg = torch.autograd.grad((rloss, rscores), r, (gl.double(), gs.double()))
    for i, g in enumerate(list(gf) + list(gw) + [gb]):
        assert_close_scaled(g, rg[i], rel if i < k else 5 * frel, f"{name} grad {i}")


@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_emulated_cuda_one_head_per_layout(heads_ops, shape):
    check(heads_ops, [shape], n=1, name=f"head {shape}")


def test_emulated_cuda_mixed_heads_odd_batch(heads_ops):
    check(heads_ops, GPU_SHAPES[1:4] + GPU_SHAPES[8:], n=3, name="mixed")


@pytest.mark.parametrize("dtype,layout", [(torch.float64, "contiguous"), (torch.bfloat16, "contiguous"),
                                          (torch.float16, "noncontiguous"),
                                          (torch.float32, "channels_last")], ids=str)
def test_emulated_cuda_dtypes_and_layouts(heads_ops, dtype, layout):
    check(heads_ops, [(5, 7, 9), (70, 9, 8), (3, 1, 1)], n=2, dtype=dtype, layout=layout,
          name=f"{dtype} {layout}")


def test_emulated_cuda_more_heads_than_one_launch(heads_ops):
    g = torch.Generator().manual_seed(7)
    shapes = [(int(torch.randint(1, 60, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g)),
               int(torch.randint(1, 5, (1,), generator=g))) for _ in range(27)]
    check(heads_ops, shapes, n=2, name="27 heads")
