"""Supervised InfoNCE over pixel latent vectors (L-Diffusion's L_CRT) and its pixel sampler.

The loss follows the paper's formula (METHODS Part 1 §4): for an anchor a and a positive p of the
same class (a != p),

    l(a, p) = -log( e^{s(a,p)/tau} / ( e^{s(a,p)/tau} + sum_{i of another class} e^{s(a,i)/tau} ) )

so the denominator holds the single positive and all negatives (other positives are not in it,
unlike SupCon). The loss is the mean of l over all ordered positive pairs of all classes; with a
single class present it is 0.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Similarity = Literal["cosine", "dot", "neg_sq_euclid"]


def standardize_features(features: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Standardise a feature stack per tile and per step.

    Args:
        features: (B, T, H, W) grey feature maps.
        eps: added to the standard deviation.

    Returns:
        (B, T, H, W): (g_k - mean_k) / (std_k + eps), statistics over each tile's H x W.
    """
    mean = features.mean(dim=(2, 3), keepdim=True)
    std = features.std(dim=(2, 3), keepdim=True, unbiased=False)
    return (features - mean) / (std + eps)


def sample_pixel_vectors(
    features: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    generator: torch.Generator | None = None,
    ignore_index: int = 255,
    min_pixels: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample up to `k` pixel vectors per class per tile, uniformly without replacement.

    Labels must already be at the features' resolution (resize them nearest-neighbour only).

    Args:
        features: (B, T, H, W) feature stack.
        labels: (B, H, W) int class ids; `ignore_index` pixels are never sampled.
        k: maximum number of pixels per class per tile (all are taken when fewer).
        generator: RNG for the draws (on the labels' device).
        ignore_index: label value to skip.
        min_pixels: classes with fewer labelled pixels in a tile are skipped there.

    Returns:
        vectors (M, T) and their labels (M,), pooled over the batch. M = 0 when nothing qualifies.
    """
    if features.shape[0] != labels.shape[0] or features.shape[2:] != labels.shape[1:]:
        raise ValueError(f"features {tuple(features.shape)} and labels {tuple(labels.shape)} disagree; "
                         "resize labels (nearest) to the features' H x W first")
    vecs, labs = [], []
    for b in range(features.shape[0]):
        flat_lab = labels[b].reshape(-1)
        flat_feat = features[b].reshape(features.shape[1], -1)
        for c in torch.unique(flat_lab).tolist():
            if c == ignore_index:
                continue
            idx = torch.nonzero(flat_lab == c, as_tuple=False).squeeze(1)
            if idx.numel() < min_pixels:
                continue
            if idx.numel() > k:
                perm = torch.randperm(idx.numel(), generator=generator, device=idx.device)[:k]
                idx = idx[perm]
            vecs.append(flat_feat[:, idx].T)
            labs.append(torch.full((idx.numel(),), c, dtype=torch.long, device=labels.device))
    if not vecs:
        return features.new_zeros((0, features.shape[1])), labels.new_zeros((0,), dtype=torch.long)
    return torch.cat(vecs), torch.cat(labs)


def similarity_matrix(v: torch.Tensor, sim: Similarity = "cosine") -> torch.Tensor:
    """Return the (M, M) similarity of vectors v (M, T) under `sim`."""
    if sim == "cosine":
        u = F.normalize(v, dim=1)
        return u @ u.T
    if sim == "dot":
        return v @ v.T
    if sim == "neg_sq_euclid":
        return -torch.cdist(v, v).pow(2) / v.shape[1]
    raise ValueError(f"sim={sim!r}; choose one of ['cosine', 'dot', 'neg_sq_euclid']")


def info_nce_loss(vectors: torch.Tensor, labels: torch.Tensor, tau: float = 0.07,
                  sim: Similarity = "cosine") -> torch.Tensor:
    """Supervised InfoNCE of the L-Diffusion paper (one positive + all negatives per term).

    Args:
        vectors: (M, T) pixel latent vectors.
        labels: (M,) class ids.
        tau: temperature.
        sim: similarity; "cosine" L2-normalises the vectors first.

    Returns:
        Scalar loss; 0 (with a graph to `vectors`) when fewer than two classes are present.

    Example:
        >>> v = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
        >>> round(info_nce_loss(v, torch.tensor([0, 0, 1]), tau=1.0).item(), 4)
        0.3133
    """
    if vectors.shape[0] == 0 or torch.unique(labels).numel() < 2:
        return vectors.sum() * 0.0
    s = similarity_matrix(vectors, sim) / tau
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    pos = same & ~eye
    if not pos.any():
        return vectors.sum() * 0.0
    neg_lse = torch.logsumexp(s.masked_fill(same, float("-inf")), dim=1, keepdim=True)  # (M, 1)
    terms = -s + torch.logaddexp(s, neg_lse.expand_as(s))  # -log softmax over {p} ∪ negatives
    return terms[pos].mean()
