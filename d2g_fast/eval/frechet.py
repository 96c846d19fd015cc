"""Fréchet distance between feature sets, through clean-fid.

Why clean-fid (and not torchmetrics or torch-fidelity): the published one-step numbers this
project compares with (GigaGAN's evaluation, reused by DMD2) were computed with clean-fid, and the
library alone moves FID (3.45 vs 3.53 on the same images). Using the same library, the same
Inception TorchScript and the same "clean" resize removes that source of disagreement.

Only clean-fid's numerical function ``cleanfid.fid.frechet_distance`` is used here; its helpers
that download weights or reference statistics (``build_feature_extractor``, ``compute_fid`` with a
dataset name, ``get_reference_statistics``) are never called.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings

import numpy as np

# clean-fid's rule for (near-)singular covariance products (e.g. fewer samples than dimensions):
# retry with this offset on both diagonals.
SINGULAR_OFFSET = 1e-6


def _as_features(feats, name: str) -> np.ndarray:
    """[N, D] float64 numpy from a numpy array or torch tensor."""
    if hasattr(feats, "detach"):
        feats = feats.detach().cpu().numpy()
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2:
        raise ValueError(f"{name}: expected features of shape [N, D], got shape {feats.shape}")
    if feats.shape[0] < 2:
        raise ValueError(f"{name}: need at least 2 samples for a covariance, got {feats.shape[0]}")
    if not np.isfinite(feats).all():
        raise ValueError(f"{name}: features hold NaN or infinite values")
    return feats


def feature_statistics(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of a feature set, in float64.

    Args:
        feats: [N, D] numpy array or torch tensor (N >= 2).
    Returns:
        (mu [D], sigma [D, D]) float64; sigma is the unbiased covariance (np.cov, as clean-fid).
    """
    feats = _as_features(feats, "feats")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2):
    |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)), computed by clean-fid in
    float64 (feature dimension D >= 2). A singular product (N < D) is handled as clean-fid does:
    the square root is retried with 1e-6 added to both diagonals (a warning says so).

    Args:
        mu1, mu2: [D] means. sigma1, sigma2: [D, D] covariances.
    Returns:
        The distance (float).
    """
    from cleanfid.fid import frechet_distance as cleanfid_frechet

    mu1, mu2 = (np.atleast_1d(np.asarray(m, dtype=np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, dtype=np.float64)) for s in (sigma1, sigma2))
    d = mu1.shape[0]
    if d < 2:  # clean-fid unpacks scipy's sqrtm(..., disp=False), which returns no pair for 1x1
        raise ValueError(f"mu1: feature dimension must be >= 2, got {d}")
    for name, arr, shape in (("mu1", mu1, (d,)), ("mu2", mu2, (d,)),
                             ("sigma1", sigma1, (d, d)), ("sigma2", sigma2, (d, d))):
        if arr.shape != shape:
            raise ValueError(f"{name}: expected shape {shape} (feature dimension {d} from mu1), "
                             f"got {arr.shape}")
    printed = io.StringIO()
    # clean-fid prints its singular-product notice, and calls sqrtm(disp=False), deprecated
    # since SciPy 1.16 (hence scipy<1.18 in the Makefile).
    with contextlib.redirect_stdout(printed), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The `disp` argument", DeprecationWarning)
        value = cleanfid_frechet(mu1, sigma1, mu2, sigma2, eps=SINGULAR_OFFSET)
    if printed.getvalue().strip():
        warnings.warn(f"clean-fid: {printed.getvalue().strip()}", RuntimeWarning, stacklevel=2)
    return float(value)


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between two feature sets (each summarised by its mean and covariance).

    Args:
        feats_a: [N, D], feats_b: [M, D] numpy arrays or torch tensors (N, M >= 2).
    Returns:
        The distance (float); about 0 for a set against itself.
    """
    mu_a, sigma_a = feature_statistics(_as_features(feats_a, "feats_a"))
    mu_b, sigma_b = feature_statistics(_as_features(feats_b, "feats_b"))
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feats_b: feature dimension {mu_b.shape[0]} differs from feats_a's "
                         f"{mu_a.shape[0]}")
    return frechet_distance_from_stats(mu_a, sigma_a, mu_b, sigma_b)


# The per-image features of a reference set (for precision / recall), kept beside its statistics
# in float32: the feature networks' own precision, half the size of float64.
FEATURES = "features"


def _stored_dtype(key: str):
    return np.float32 if key == FEATURES else np.float64


def save_statistics(path: str, **stats: np.ndarray) -> None:
    """Write statistics as an .npz (clean-fid's layout: ``mu`` and ``sigma``, plus any other
    named arrays such as ``extra_mu`` / ``extra_sigma``) in float64; ``features`` (the reference
    images' features [N, D], for precision / recall) in float32."""
    from d2g_fast.data.store import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v, dtype=_stored_dtype(k)) for k, v in stats.items()})
    atomic_write_bytes(path, buf.getvalue())


def load_statistics(path: str, what: str = "--reference") -> dict[str, np.ndarray]:
    """Read an .npz of statistics holding at least ``mu`` [D] and ``sigma`` [D, D] (clean-fid's
    layout; float64), and ``features`` [N, D] (float32) when it was saved with them. Errors name
    ``what`` (the argument the path came from)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no such file {path!r}")
    try:
        with np.load(path, allow_pickle=False) as data:
            stats = {k: np.asarray(data[k], dtype=_stored_dtype(k)) for k in data.files}
    except (OSError, ValueError) as exc:
        raise ValueError(f"{what}: {path!r} is not a readable .npz of statistics: {exc}") from exc
    for key, ndim in (("mu", 1), ("sigma", 2)):
        if key not in stats or stats[key].ndim != ndim:
            raise ValueError(f"{what}: {path!r} lacks {key!r} ({ndim}-D); expected clean-fid's "
                             f"layout (mu [D], sigma [D, D])")
    features = stats.get(FEATURES)
    if features is not None and (features.ndim != 2 or features.shape[1] != stats["mu"].shape[0]):
        raise ValueError(f"{what}: {path!r} holds {FEATURES!r} of shape {features.shape}, not "
                         f"[N, {stats['mu'].shape[0]}]")
    return stats
