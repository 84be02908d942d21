"""Training: the one loop (`fit`), its state file and the small validation metrics."""

from __future__ import annotations

from ldiffusion.train.loop import FitResult, fit

__all__ = ["FitResult", "fit"]
