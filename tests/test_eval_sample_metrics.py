"""Precision / recall (Kynkäänniemi et al. 2019) and per-prompt diversity on constructed and
hand-worked cases, and against a brute-force numpy computation."""
import math

import numpy as np
import pytest
import torch

from d2g_fast.eval import per_prompt_diversity, precision_recall
from d2g_fast.eval.manifold import fraction_inside, knn_radii

# Hand-worked 2-D example (distances worked out in the comments).
REAL = np.array([[0, 0], [3, 0], [0, 4], [10, 10]], dtype=np.float64)
FAKE = np.array([[1, 1], [6, 0], [5, 1], [0, -9]], dtype=np.float64)


def _brute_force(real, fake, k):
    def radii(x):
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def inside(points, centres, r):
        d = np.sqrt(((points[:, None] - centres[None]) ** 2).sum(-1))
        return float((d <= r[None]).any(1).mean())

    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def test_hand_worked_radii():
    # real: r1-r2 3, r1-r3 4, r2-r3 5, r4 to r3/r2/r1: sqrt(136), sqrt(149), sqrt(200)
    np.testing.assert_array_equal(knn_radii(REAL, 1).numpy(), [3, 3, 4, math.sqrt(136)])
    np.testing.assert_array_equal(knn_radii(REAL, 2).numpy(), [4, 5, 5, math.sqrt(149)])
    # fake: f1-f3 4, f2-f3 sqrt(2), f1-f4 sqrt(101)
    np.testing.assert_allclose(knn_radii(FAKE, 1).numpy(),
                               [4, math.sqrt(2), math.sqrt(2), math.sqrt(101)], rtol=1e-15)


@pytest.mark.parametrize("k,precision,recall", [
    # k=1: f4 (0,-9) lies in no real ball (nearest r1 at 9 > 3); f2 (6,0) is exactly on r2's
    # boundary (3 = 3: inside); r4 (10,10) lies in no fake ball (f3 at sqrt(106) > sqrt(2)).
    (1, 0.75, 0.75),
    # k=2: real radii 4, 5, 5, sqrt(149): f4 still outside; fake radii sqrt(26), sqrt(26), 4,
    # sqrt(117): r4 still outside (f2 at sqrt(116) > sqrt(26)).
    (2, 0.75, 0.75),
    # k=3: r1's radius sqrt(200) takes in f4 (9); f2's radius sqrt(117) takes in r4 (sqrt(116)).
    (3, 1.0, 1.0),
])
def test_hand_worked_precision_recall(k, precision, recall):
    got = precision_recall(REAL, FAKE, k)
    assert (got["precision"], got["recall"]) == (precision, recall)
    assert (got["k"], got["num_real"], got["num_fake"]) == (k, 4, 4)
    assert _brute_force(REAL, FAKE, k) == (precision, recall)


def test_boundary_is_inside():
    # f2 is at distance exactly 3 from r2, whose k=1 radius is 3.
    assert fraction_inside(FAKE[1:2], REAL[1:2], [3.0]) == 1.0
    assert fraction_inside(FAKE[1:2], REAL[1:2], [2.999]) == 0.0


def test_identical_sets_give_one_and_disjoint_sets_zero():
    x = np.random.default_rng(0).standard_normal((60, 8))
    assert precision_recall(x, x.copy()) == {"precision": 1.0, "recall": 1.0, "k": 3,
                                             "num_real": 60, "num_fake": 60}
    far = precision_recall(x, x + 100.0)
    assert far["precision"] == 0.0 and far["recall"] == 0.0


def test_collapsed_set_has_no_recall_and_no_diversity():
    rng = np.random.default_rng(1)
    real = rng.standard_normal((80, 6))
    collapsed = np.repeat(real.mean(0, keepdims=True), 40, axis=0)  # one point, 40 times
    got = precision_recall(real, collapsed)
    assert got["precision"] == 1.0  # the one point is typical of the real set ...
    assert got["recall"] == 0.0  # ... but covers nothing: its balls have radius 0
    div = per_prompt_diversity(collapsed, [i % 4 for i in range(40)])
    assert div["mean"] == 0.0 and div["prompts"] == 4 and div["pairs"] == 4 * 45


@pytest.mark.parametrize("batch_size", [1, 7, None])
def test_blocks_and_dtypes_match_brute_force(batch_size):
    rng = np.random.default_rng(2)
    real, fake = rng.standard_normal((50, 5)), rng.standard_normal((37, 5)) * 1.3 + 0.4
    expected = _brute_force(real, fake, 3)
    got = precision_recall(real, fake, batch_size=batch_size)
    assert (got["precision"], got["recall"]) == expected
    got32 = precision_recall(torch.from_numpy(real).float(), fake, batch_size=batch_size,
                             dtype=torch.float32)
    assert (got32["precision"], got32["recall"]) == expected
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # a case that can fail


def test_precision_recall_bad_input():
    x = np.zeros((4, 2))
    with pytest.raises(ValueError, match="k: must be in"):
        precision_recall(x, x, k=4)
    with pytest.raises(ValueError, match="fake: feature dimension"):
        precision_recall(x, np.zeros((4, 3)))
    with pytest.raises(ValueError, match="real: expected features of shape"):
        precision_recall(np.zeros(4), x)
    with pytest.raises(ValueError, match="NaN"):
        precision_recall(x, np.full((4, 2), np.nan))
    with pytest.raises(ValueError, match="batch_size"):
        precision_recall(x, x, k=1, batch_size=0)


def test_diversity_hand_worked():
    # prompt "a": (0,0),(3,4): one pair, 5. prompt "b": (0,0),(1,0),(0,1): pairs 1, 1, sqrt 2.
    # prompt "c": one sample, no pair (left out).
    feats = np.array([[0, 0], [0, 0], [9, 9], [3, 4], [1, 0], [0, 1]], dtype=np.float64)
    prompts = ["a", "b", "c", "a", "b", "b"]
    got = per_prompt_diversity(feats, prompts)
    b = (2 + math.sqrt(2)) / 3
    assert got["mean"] == pytest.approx((5 + b) / 2, rel=1e-15)
    assert got["std"] == pytest.approx((5 - b) / 2, rel=1e-15)
    assert (got["prompts"], got["pairs"]) == (2, 4)
    # Every prompt weighs the same: more samples of "b" do not move "a"'s share.
    assert per_prompt_diversity(feats, prompts, batch_size=1) == got


def test_diversity_custom_distance_and_errors():
    x = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    l1 = per_prompt_diversity(x, [0, 0, 1, 1, 2, 2], distance=lambda a, b: (a - b).abs().sum(1))
    assert l1["mean"] == 4.0 and l1["std"] == 0.0 and l1["pairs"] == 3  # |2| + |2| each pair
    # A loss returning (B, 1, 1, 1), as E-LatentLPIPS does, is flattened.
    shaped = per_prompt_diversity(x, [0, 0, 1, 1, 2, 2],
                                  distance=lambda a, b: (a - b).abs().sum(1).view(-1, 1, 1, 1))
    assert shaped == l1
    with pytest.raises(ValueError, match="no prompt has two"):
        per_prompt_diversity(x, list(range(6)))
    with pytest.raises(ValueError, match="prompts: 5 keys for 6 samples"):
        per_prompt_diversity(x, list(range(5)))
