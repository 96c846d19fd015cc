"""Assertions with failure messages that say where and by how much (import as `from d2g_asserts import assert_close`)."""
import torch


def assert_close(actual, expected, *, atol, rtol=0.0, name="value"):
    """allclose that says where and by how much it failed."""
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (an unwritten output?)"
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    bad = err > bound
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements off; max abs err {err.max().item():.3e} "
            f"(atol {atol:g}, rtol {rtol:g}); first at {idx}: {actual[idx].item():.8g} vs "
            f"{expected[idx].item():.8g}")
