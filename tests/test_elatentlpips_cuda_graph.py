"""E-LatentLPIPS WITH its augmentation ensemble captured in a CUDA graph (GPU only).

With device-drawn augmentation parameters (the default sampler for CUDA latents) the whole loss
step, augmentation included, has no host synchronisation, so it can be captured once and
replayed: every replay must draw a NEW augmentation (the Philox offset advances with the CUDA
generator, as torch's own dropout does under graphs) and equal the eager loss computed from the
same generator state."""
from __future__ import annotations

import pytest
import torch
from test_elatentlpips import latents, make_model, rel_err


def _capture(model, x, y):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: BN fold cache, cuDNN plans, allocator pools
        for _ in range(3):
            x.grad = None
            model(x, y).sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = model(x, y)
        out.sum().backward()
    return graph, out


@pytest.mark.cuda
@pytest.mark.parametrize("preset", ["bg", "bgco"])
def test_augmented_loss_replays_new_draws_matching_eager(preset):
    model = make_model("sd15", augment=preset, precision="bf16").cuda()
    assert model.augment is not None
    x0, y0 = (t.cuda() for t in latents(4, 4, 32, 32, seed=31))
    x = x0.clone().requires_grad_(True)
    y = y0.clone()
    graph, out = _capture(model, x, y)

    replays = []
    for _ in range(2):
        state = torch.cuda.get_rng_state()
        graph.replay()
        torch.cuda.synchronize()
        replayed, grad = out.detach().clone(), x.grad.detach().clone()
        # the same generator state, eagerly: the same augmentation must be drawn
        torch.cuda.set_rng_state(state)
        x_eager = x0.clone().requires_grad_(True)
        want = model(x_eager, y0)
        want.sum().backward()
        assert rel_err(replayed, want.detach()) < 1e-4, \
            f"replayed vs eager loss: max rel err {rel_err(replayed, want.detach()):.3g}"
        assert rel_err(grad, x_eager.grad) < 1e-3, \
            f"replayed vs eager gradient: max rel err {rel_err(grad, x_eager.grad):.3g}"
        replays.append(replayed)
    assert not torch.equal(replays[0], replays[1]), "two replays drew the same augmentation"


@pytest.mark.cuda
def test_augmented_loss_has_no_host_sync():
    model = make_model("sd15", augment="bgco", precision="bf16", check_inputs=False).cuda()
    x0, y0 = (t.cuda() for t in latents(2, 4, 32, 32, seed=32))
    x = x0.clone().requires_grad_(True)
    model(x, y0).sum().backward()  # warm-up outside the check (BN folding, plans)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x.grad = None
        model(x, y0).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
