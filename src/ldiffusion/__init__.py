"""ldiffusion: diffusion models for pathology image segmentation (L-Diffusion, LDSeg, cDAL)."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
