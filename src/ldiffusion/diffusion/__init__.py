"""Diffusion core: noise families, schedules, the diffusion process and samplers. Never imports nets."""

from __future__ import annotations

from ldiffusion.diffusion.noise import (
    NOISES,
    Cauchy,
    Gaussian,
    Laplace,
    NoiseDistribution,
    StudentT,
    make_noise,
)
from ldiffusion.diffusion.process import DiffusionProcess, EpsFn
from ldiffusion.diffusion.samplers import VPPosterior
from ldiffusion.diffusion.schedules import (
    SCHEDULE_KINDS,
    ComponentSchedule,
    Schedule,
    cosine_alphas_cumprod,
    cosine_betas,
    gammas_from_frequencies,
    linear_betas,
    reduce_labels_majority,
    scaled_linear_betas,
    vp_betas,
)
from ldiffusion.diffusion.timesteps import training_timesteps

__all__ = [
    "NOISES",
    "SCHEDULE_KINDS",
    "Cauchy",
    "ComponentSchedule",
    "DiffusionProcess",
    "EpsFn",
    "Gaussian",
    "Laplace",
    "NoiseDistribution",
    "Schedule",
    "StudentT",
    "VPPosterior",
    "cosine_alphas_cumprod",
    "cosine_betas",
    "gammas_from_frequencies",
    "linear_betas",
    "make_noise",
    "reduce_labels_majority",
    "scaled_linear_betas",
    "training_timesteps",
    "vp_betas",
]
