"""Class balancing from pixel frequencies: counts per class and inverse-frequency weights (pure functions)."""

from __future__ import annotations

import torch


def class_pixel_counts(labels: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """Count the labelled pixels of each class.

    Args:
        labels: (B, H, W) int64 class ids in [0, K) or `ignore_index` (ignored; other values are
            ignored too).
        num_classes: K.
        ignore_index: unlabelled value.

    Returns:
        (K,) float64 pixel counts.

    Example:
        >>> class_pixel_counts(torch.tensor([[[0, 0, 2], [255, 2, 2]]]), 3).tolist()
        [2.0, 0.0, 3.0]
    """
    flat = labels.reshape(-1)
    keep = (flat != ignore_index) & (flat >= 0) & (flat < num_classes)
    return torch.bincount(flat[keep], minlength=num_classes)[:num_classes].to(torch.float64)


def inverse_frequency_weights(counts: torch.Tensor, max_weight: float) -> torch.Tensor:
    """Return per-class weights w_c = 1 / (K' f_c), clipped to `max_weight`.

    f_c = n_c / sum(n) is the pixel frequency of class c and K' the number of classes with n_c > 0.
    Before clipping, the weight averaged over pixels is 1 (sum_c f_c w_c = 1), so a weighted mean
    squared error keeps the scale of the unweighted one, and every present class carries the same
    total weight 1/K' (the "balanced" weighting of scikit-learn). A class never seen (n_c = 0) gets
    `max_weight` (it has no pixels to weigh yet). All zero counts give all-ones weights.

    Args:
        counts: (K,) non-negative pixel counts (float or int).
        max_weight: upper clip (> 0), so a class of 0.1 % of the pixels does not dominate.

    Returns:
        (K,) float32 weights.

    Example:
        >>> inverse_frequency_weights(torch.tensor([6.0, 3.0, 1.0]), 2.0).tolist()  # f = .6 .3 .1, K' = 3
        [0.5555555820465088, 1.1111111640930176, 2.0]
    """
    c = counts.to(torch.float64)
    present = c > 0
    k = int(present.sum())
    if k == 0:
        return torch.ones_like(c, dtype=torch.float32)
    f = c / c.sum()
    w = torch.where(present, 1.0 / (k * f.clamp_min(1e-300)), torch.full_like(c, float(max_weight)))
    return w.clamp(max=float(max_weight)).to(torch.float32)


__all__ = ["class_pixel_counts", "inverse_frequency_weights"]
