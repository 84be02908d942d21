"""Pure loss functions (no I/O, no global state)."""

from __future__ import annotations

from ldiffusion.losses.class_balance import class_pixel_counts, inverse_frequency_weights
from ldiffusion.losses.dice import soft_dice_loss

__all__ = ["class_pixel_counts", "inverse_frequency_weights", "soft_dice_loss"]
