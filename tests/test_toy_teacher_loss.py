"""The toy teacher's loss (issue 25): the high-noise weight and the pure-noise inputs."""
import torch

from d2g_fast.toy import models
from d2g_fast.toy.train import PURE_NOISE_MIN_T, high_noise_weight, pure_noise_inputs


def _alphas():
    return models.build_scheduler().alphas_cumprod


def test_high_noise_weight_is_clipped_inverse_snr():
    alphas = _alphas()
    t = torch.tensor([0, 300, 500, 700, 999])
    w = high_noise_weight(alphas[t], cap=10.0)
    inv_snr = (1 - alphas[t]) / alphas[t]
    # SNR >= 1: plain epsilon loss; t = 500: 1/SNR (2.6); t = 700, 999: the cap.
    assert w[0] == 1 and w[1] == 1
    torch.testing.assert_close(w[2], inv_snr[2])
    assert 2 < w[2] < 3 and w[3] == 10 and w[4] == 10
    assert torch.equal(high_noise_weight(alphas[t], cap=1.0), torch.ones(5))


def test_pure_noise_inputs_encode_the_real_latent():
    alphas = _alphas()
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(8, 4, 8, 8, generator=g), torch.randn(8, 4, 8, 8, generator=g)
    t = torch.randint(1000, (8,), generator=g)
    zt, t2, target = pure_noise_inputs(z0, eps, t, alphas, 0.25, g)
    # the first quarter: pure noise at a high t; the rest: the usual noising at the drawn t
    assert torch.equal(zt[:2], eps[:2]) and (t2[:2] >= PURE_NOISE_MIN_T).all()
    assert torch.equal(t2[2:], t[2:])
    torch.testing.assert_close(target[2:], eps[2:])
    # every target implies the real latent as x0 (what the sampler's first step decodes)
    a = alphas[t2].view(-1, 1, 1, 1)
    torch.testing.assert_close((zt - (1 - a).sqrt() * target) / a.sqrt(), z0, atol=1e-4, rtol=1e-4)
    # fraction 0: the plain epsilon objective
    zt0, t0, target0 = pure_noise_inputs(z0, eps, t, alphas, 0.0, g)
    assert torch.equal(t0, t)
    torch.testing.assert_close(target0, eps)
