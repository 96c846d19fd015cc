"""Evaluation: generation + features in shards, Fréchet distance (clean-fid) and CLIP score,
reports under a pinned protocol (``d2g eval``, ``d2g compare``).

Public API, also for toy evaluations with any feature extractor (no other Fréchet code in the
package):
    feature_statistics(feats [N, D]) -> (mu [D], sigma [D, D])            float64
    frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> float       clean-fid's computation
    frechet_distance(feats_a [N, D], feats_b [M, D]) -> float            numpy arrays or tensors
    extract_features(images [N, ...], extractor: nn.Module, batch_size) -> [N, D] float64 numpy
    precision_recall(real [N, D], fake [M, D], k=3) -> {"precision", "recall", "k", ...}
        Kynkäänniemi et al. 2019's k-NN manifold estimate (d2g_fast.eval.manifold)
    per_prompt_diversity(samples [N, ...], prompts, distance=None) -> {"mean", "std", ...}
        mean pairwise distance between samples of the same prompt (d2g_fast.eval.diversity)
Fewer samples than dimensions (singular covariances) are handled as clean-fid does: the matrix
square root is retried with 1e-6 added to both diagonals (with a RuntimeWarning).

Example (a toy classifier's penultimate layer as the feature space):
    from d2g_fast.eval import extract_features, frechet_distance
    fd = frechet_distance(extract_features(real, trunk), extract_features(fake, trunk))
"""
from d2g_fast.eval.diversity import per_prompt_diversity
from d2g_fast.eval.features import extract_features
from d2g_fast.eval.frechet import (feature_statistics, frechet_distance,
                                   frechet_distance_from_stats, load_statistics, save_statistics)
from d2g_fast.eval.manifold import precision_recall

__all__ = ["extract_features", "feature_statistics", "frechet_distance",
           "frechet_distance_from_stats", "load_statistics", "per_prompt_diversity",
           "precision_recall", "save_statistics"]
