"""Samplers: DDPM and DDIM steps live in ``ldiffusion.diffusion.process``; cDAL's VP posterior here."""

from __future__ import annotations

from ldiffusion.diffusion.samplers.vp_posterior import VPPosterior

__all__ = ["VPPosterior"]
