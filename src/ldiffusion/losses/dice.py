"""Multi-class soft Dice loss (METHODS Part 1 §4, [I] smoothed form)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255,
                   include_background: bool = False, smooth: float = 1.0) -> torch.Tensor:
    """Return 1 - mean_c (2 sum P*Y + s) / (sum P + sum Y + s) over the classes present.

    Probabilities are the softmax of `logits`; pixels labelled `ignore_index` are excluded from all
    sums. The mean runs over the classes present in `target` (in the whole batch), so a class
    missing from a crop neither rewards nor penalises; when no counted class is present the loss
    is 0 (leave that case to a cross-entropy term).

    Args:
        logits: (B, K, H, W) float, unnormalised class scores.
        target: (B, H, W) int64 class ids in [0, K) or `ignore_index`.
        ignore_index: label value that is excluded.
        include_background: also average over class 0.
        smooth: additive smoothing s (> 0 keeps empty classes finite).

    Returns:
        Scalar loss in [0, 1]; 0 (with zero gradient) when no counted class is labelled.

    Example:
        >>> lg = torch.tensor([[[[10.0]], [[-10.0]]]])            # (1, 2, 1, 1), predicts class 0
        >>> round(float(soft_dice_loss(lg, torch.tensor([[[0]]]), include_background=True)), 3)
        0.0
    """
    if logits.ndim != 4 or target.ndim != 3 or logits.shape[0] != target.shape[0] \
            or logits.shape[2:] != target.shape[1:]:
        raise ValueError(f"expected logits (B, K, H, W) and target (B, H, W), got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")
    k = logits.shape[1]
    probs = torch.softmax(logits.float(), dim=1)
    valid = target != ignore_index  # (B, H, W)
    if not bool(valid.any()):
        return logits.sum() * 0.0
    safe = torch.where(valid, target, torch.zeros_like(target)).clamp(0, k - 1)
    onehot = F.one_hot(safe, k).permute(0, 3, 1, 2).float()  # (B, K, H, W)
    m = valid.unsqueeze(1).float()
    probs = probs * m
    onehot = onehot * m
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)  # (K,)
    classes = torch.arange(k, device=logits.device)
    keep = (onehot.sum(dims) > 0) & (classes >= (0 if include_background else 1))
    if not bool(keep.any()):
        return logits.sum() * 0.0
    return 1.0 - dice[keep].mean()
