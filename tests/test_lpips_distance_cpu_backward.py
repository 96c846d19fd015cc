"""The single-layer distance's CPU backward writes both gradients in one pass over the inputs:
each input's gradient alone, and both, in every layout, against the float64 reference."""
import pytest
import torch

from d2g_asserts import assert_close
from d2g_fast import _ext
from d2g_fast.ops import lpips_distance
from d2g_fast.ref.lpips_distance import lpips_distance as reference
from test_lpips_distance import make_inputs

pytestmark = pytest.mark.skipif(not _ext.ext_loaded(), reason=f"extension missing: {_ext.ext_error()}")


@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous", "channels_last", "mixed"])
@pytest.mark.parametrize("wanted", ["f0", "f1", "both"])
@pytest.mark.parametrize("spatial", [False, True])
def test_one_or_both_gradients(layout, wanted, spatial):
    f0, f1, w = make_inputs((2, 7, 3, 5), layout=layout)
    leaves = {"f0": (0,), "f1": (1,), "both": (0, 1)}[wanted]
    inputs = [f0.detach().requires_grad_(0 in leaves), f1.detach().requires_grad_(1 in leaves)]
    inputs64 = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    out = lpips_distance(inputs[0], inputs[1], w, spatial=spatial, impl="cpu")
    g = torch.rand(out.shape, generator=torch.Generator().manual_seed(3)) + 0.5
    got = torch.autograd.grad(out, [inputs[i] for i in leaves], g)
    want = torch.autograd.grad(reference(inputs64[0], inputs64[1], w.double(), spatial=spatial),
                               [inputs64[i] for i in leaves], g.double())
    for i, a, b in zip(leaves, got, want):
        assert a.stride() == inputs[i].stride() or layout == "noncontiguous"
        assert_close(a, b.float(), atol=1e-5, rtol=1e-4, name=f"grad f{i} ({layout}, {wanted})")
