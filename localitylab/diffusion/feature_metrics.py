"""Sample quality in a feature space: the Fréchet distance and k-NN precision/recall.

- Fréchet distance between the Gaussians fitted to two feature sets (Heusel et al. 2017; with
  Inception-v3 pool features it is FID, with any other network's features it is not, and is
  named for the network: `fd_resnet-n`):
  |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2).
  The matrix square root is taken through symmetric eigendecompositions in float64:
  S_a^1/2 S_b S_a^1/2 is symmetric positive semi-definite and similar to S_a S_b, so the
  trace of its square root is the usual tr((S_a S_b)^1/2) without scipy's `sqrtm` on a
  non-symmetric product (whose round-off gives complex parts that must be discarded).
- Precision and recall (Kynkäänniemi et al. 2019): each feature set is a union of balls,
  one per point, of radius the distance to its k-th nearest neighbour in its own set.
  Precision = the share of generated points inside the real manifold; recall = the share
  of real points inside the generated one.
"""

from __future__ import annotations

import numpy as np
import torch

PRECISION_RECALL_K = 3  # Kynkäänniemi et al.'s default


def gaussian_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of features (n, d), in float64; the covariance is unbiased (n - 1)."""
    x = _float64(features)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need at least 2 feature vectors (n, d), got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def frechet_distance_gaussians(mean_a: np.ndarray, cov_a: np.ndarray, mean_b: np.ndarray, cov_b: np.ndarray) -> float:
    """The Fréchet (2-Wasserstein squared) distance between N(mean_a, cov_a) and N(mean_b, cov_b)."""
    mean_a, mean_b = np.asarray(mean_a, np.float64), np.asarray(mean_b, np.float64)
    cov_a, cov_b = _symmetric(cov_a), _symmetric(cov_b)
    root_a = _psd_sqrt(cov_a)
    middle = np.linalg.eigvalsh(_symmetric(root_a @ cov_b @ root_a))
    trace_root = np.sqrt(np.clip(middle, 0.0, None)).sum()
    diff = mean_a - mean_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_root)


def frechet_distance(features_a: np.ndarray | torch.Tensor, features_b: np.ndarray | torch.Tensor) -> float:
    """The Fréchet distance between the Gaussians fitted to two feature sets (n_a, d), (n_b, d).

    With fewer vectors than dimensions (a few samples in Inception's 2,048) the covariances
    have rank below d, and the d x d eigendecompositions cost d^3 for nothing: with A, B the
    centred sets over sqrt(n - 1), S_a = A'A and S_b = B'B, so tr(S_a) = |A|^2, and S_a S_b
    has the non-zero eigenvalues of (A B')(A B')', whence tr((S_a S_b)^1/2) is the sum of the
    singular values of the n_a x n_b matrix A B'. The same number, exactly, at n_a n_b d."""
    a, b = _float64(features_a), _float64(features_b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) * len(b) >= a.shape[1] ** 2:
        return frechet_distance_gaussians(*gaussian_statistics(a), *gaussian_statistics(b))
    (mean_a, centred_a), (mean_b, centred_b) = _centred(a), _centred(b)
    trace_root = np.linalg.svd(centred_a @ centred_b.T, compute_uv=False).sum()
    diff = mean_a - mean_b
    return float(diff @ diff + (centred_a ** 2).sum() + (centred_b ** 2).sum() - 2.0 * trace_root)


def _centred(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, (x - mean) / sqrt(n - 1)): the factor A of the unbiased covariance A'A."""
    if len(x) < 2:
        raise ValueError(f"need at least 2 feature vectors (n, d), got shape {x.shape}")
    mean = x.mean(axis=0)
    return mean, (x - mean) / np.sqrt(len(x) - 1)


def precision_recall(real: np.ndarray | torch.Tensor, generated: np.ndarray | torch.Tensor,
                     k: int = PRECISION_RECALL_K, block: int = 1024) -> tuple[float, float]:
    """(precision, recall) of `generated` against `real` with k-NN balls (Kynkäänniemi et al. 2019)."""
    real_t, generated_t = torch.from_numpy(_float64(real)), torch.from_numpy(_float64(generated))
    for name, x in (("real", real_t), ("generated", generated_t)):
        if len(x) <= k:
            raise ValueError(f"precision/recall with k={k} needs more than {k} {name} feature vectors, got {len(x)}")
    real_radii = knn_radii(real_t, k, block)
    generated_radii = knn_radii(generated_t, k, block)
    precision = _inside_share(generated_t, real_t, real_radii, block)
    recall = _inside_share(real_t, generated_t, generated_radii, block)
    return precision, recall


def knn_radii(points: torch.Tensor, k: int, block: int = 1024) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point of the same set."""
    radii = torch.empty(len(points), dtype=points.dtype)
    for start in range(0, len(points), block):
        distances = torch.cdist(points[start:start + block], points)
        # The k+1-th smallest: the smallest is the point itself, at distance 0.
        radii[start:start + block] = distances.kthvalue(k + 1, dim=1).values
    return radii


def _inside_share(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block: int) -> float:
    """The share of `queries` that lie in at least one ball (centre, radius)."""
    inside = 0
    for start in range(0, len(queries), block):
        distances = torch.cdist(queries[start:start + block], centres)
        inside += int((distances <= radii[None, :]).any(dim=1).sum())
    return inside / len(queries)


def _float64(features: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().double().numpy()
    return np.asarray(features, dtype=np.float64)


def _symmetric(matrix: np.ndarray) -> np.ndarray:
    matrix = np.atleast_2d(np.asarray(matrix, dtype=np.float64))
    return (matrix + matrix.T) / 2.0


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


@torch.no_grad()
def classifier_outputs(model: torch.nn.Module, prepare, images: torch.Tensor,
                       batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, logits) of a timm classifier on uint8 images: the features are its
    pre-logits (`forward_head(..., pre_logits=True)`: the pooled vector its head reads).
    `prepare(uint8 batch) -> model input` is the classifier's own preparation."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    features, logits = [], []
    try:
        for start in range(0, len(images), batch_size):
            trunk = model.forward_features(prepare(images[start:start + batch_size].to(device)))
            features.append(model.forward_head(trunk, pre_logits=True).float().cpu())
            logits.append(model.forward_head(trunk).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(features), torch.cat(logits)
