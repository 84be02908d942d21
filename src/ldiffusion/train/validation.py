"""Tiny validation metrics used for checkpoint selection (the full metrics live in `eval/`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def pad_to_multiple(images: torch.Tensor, divisor: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad (B, C, H, W) at the bottom/right to multiples of `divisor`; return it and (H, W)."""
    h, w = images.shape[-2:]
    ph, pw = (-h) % divisor, (-w) % divisor
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        images = F.pad(images, (0, pw, 0, ph), mode=mode)
    return images, (h, w)


class DiceAccumulator:
    """Accumulate a confusion matrix over batches and report dataset-level Dice per class.

    Pixels labelled `ignore_index` are skipped. A class absent from both prediction and ground
    truth has Dice NaN and is left out of the mean.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.k = num_classes
        self.ignore_index = ignore_index
        self.cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add (B, H, W) integer predictions and targets."""
        valid = target != self.ignore_index
        t = target[valid].long().cpu()
        p = pred[valid].long().cpu().clamp(0, self.k - 1)
        self.cm += torch.bincount(t * self.k + p, minlength=self.k * self.k).view(self.k, self.k)

    def dice(self) -> list[float]:
        """Return the Dice of each class (NaN when the class is absent from both)."""
        tp = self.cm.diag().double()
        denom = self.cm.sum(0).double() + self.cm.sum(1).double()
        return [
            float(2 * a / d) if d > 0 else math.nan for a, d in zip(tp.tolist(), denom.tolist(), strict=True)
        ]

    def mean_foreground_dice(self) -> float:
        """Mean Dice over classes 1..K-1 that occur (0.0 when none; class 0 when K == 1)."""
        d = self.dice()
        fg = [x for x in (d[1:] if self.k > 1 else d) if not math.isnan(x)]
        return float(sum(fg) / len(fg)) if fg else 0.0


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Return the PSNR in dB of each image of (B, C, H, W) tensors `x` vs `y`."""
    mse = ((x.float() - y.float()) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(data_range**2 / mse)
