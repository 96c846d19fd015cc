"""d2g_fast.eval's Fréchet distance and feature extractors, against float64 references."""
import os
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from eval_fixtures import TinyInception, save_tiny_inception

from d2g_fast.eval import (extract_features, feature_statistics, frechet_distance,
                           frechet_distance_from_stats)
from d2g_fast.eval.features import INCEPTION_FILE, INCEPTION_URL, InceptionFeatures


def _spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _reference_fd(mu1, s1, mu2, s2):
    """Float64 reference with the symmetric form tr(sqrt(s1^1/2 s2 s1^1/2)), another route than
    the library's sqrtm(s1 s2)."""
    r1 = scipy.linalg.sqrtm(s1).real
    cross = scipy.linalg.sqrtm(r1 @ s2 @ r1).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(cross))


def test_known_gaussians_match_float64_reference():
    rng = np.random.default_rng(1)
    for d in (2, 3, 7):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = _spd(rng, d), _spd(rng, d)
        got = frechet_distance_from_stats(mu1, s1, mu2, s2)
        assert got == pytest.approx(_reference_fd(mu1, s1, mu2, s2), rel=1e-9, abs=1e-10)


def test_diagonal_gaussians_closed_form():
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    expected = 5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()  # |dmu|^2 + sum (sqrt a - sqrt b)^2
    assert frechet_distance_from_stats(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(
        expected, rel=1e-12)


def test_samples_of_known_gaussians_approach_the_analytic_distance():
    rng = np.random.default_rng(2)
    mu1, mu2, s1, s2 = np.zeros(3), np.array([0.5, 0.0, -1.0]), _spd(rng, 3), _spd(rng, 3)
    x = rng.multivariate_normal(mu1, s1, 40000)
    y = rng.multivariate_normal(mu2, s2, 40000)
    assert frechet_distance(x, y) == pytest.approx(_reference_fd(mu1, s1, mu2, s2), abs=0.03)


def test_set_against_itself_is_zero_and_tensor_inputs_work():
    x = np.random.default_rng(3).standard_normal((50, 6))
    assert abs(frechet_distance(x, x)) < 1e-9
    assert frechet_distance(torch.from_numpy(x).float(), torch.from_numpy(x + 1).float()) == \
        pytest.approx(6.0, rel=1e-5)
    mu, sigma = feature_statistics(x)
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-12)


def test_fewer_samples_than_dimensions():
    # Singular covariances (N < D): finite, ~0 against itself, and a pure mean shift costs
    # exactly |shift|^2 since the covariances are equal.
    x = np.random.default_rng(4).standard_normal((5, 16))
    shift = np.linspace(-1, 1, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # clean-fid's singular-product retry
        self_fd = frechet_distance(x, x)
        shifted = frechet_distance(x, x + shift)
    assert np.isfinite(self_fd) and abs(self_fd) < 1e-4
    assert shifted == pytest.approx((shift ** 2).sum(), abs=1e-4)


def test_bad_shapes_name_the_argument():
    with pytest.raises(ValueError, match="feats_a"):
        frechet_distance(np.zeros(5), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="feats_b.*dimension"):
        frechet_distance(np.random.randn(5, 2), np.random.randn(5, 3))
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="dimension must be >= 2"):
        frechet_distance_from_stats(np.zeros(1), np.eye(1), np.zeros(1), np.eye(1))
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance_from_stats(np.zeros(2), np.eye(2), np.zeros(2), np.eye(3))


def test_extract_features_any_module_batch_independent():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(2))
    images = torch.rand(7, 3, 9, 9)
    with torch.no_grad():
        expected = net(images).reshape(7, -1).double().numpy()
    for batch_size in (1, 3, 7, 64):
        got = extract_features(images, net, batch_size=batch_size)
        assert got.shape == (7, 16) and got.dtype == np.float64
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    uint8 = (images * 255).to(torch.uint8).numpy()  # integer inputs are cast to float32
    assert extract_features(uint8, net).shape == (7, 16)


def test_inception_features_equal_clean_fid_path(tmp_path):
    """Our loader computes what clean-fid's InceptionV3W + "clean" resize compute (same file, a
    2048-D stand-in under clean-fid's file name, loaded without download)."""
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import build_resizer

    path = save_tiny_inception(str(tmp_path / INCEPTION_FILE), dim=2048)
    images = np.random.default_rng(5).integers(0, 256, (2, 20, 17, 3), dtype=np.uint8)
    ours = InceptionFeatures(path)(images)
    theirs_model = InceptionV3W(str(tmp_path), download=False)
    resize = build_resizer("clean")
    batch = torch.stack([torch.from_numpy(resize(im)).permute(2, 0, 1) for im in images])
    with torch.no_grad():
        theirs = theirs_model(batch).double().numpy()
    np.testing.assert_array_equal(ours, theirs)
    assert isinstance(TinyInception(3), torch.nn.Module)


def test_missing_inception_file_names_the_argument_and_source(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        InceptionFeatures(str(tmp_path / "nope.pt"))
    msg = str(err.value)
    assert "--inception-weights" in msg and "nope.pt" in msg and INCEPTION_URL in msg
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not torchscript")
    with pytest.raises(ValueError, match="--inception-weights.*TorchScript"):
        InceptionFeatures(str(bad))
    assert not os.path.exists(tmp_path / INCEPTION_FILE)  # nothing was downloaded
