"""Pure loss functions (no I/O, no global state)."""

from __future__ import annotations

from ldiffusion.losses.dice import soft_dice_loss

__all__ = ["soft_dice_loss"]
