"""cDAL's few-step VP process: Markov training pairs and the Gaussian posterior sampler.

1-based steps k = 1..T (cDAL notation): β_k from ``vp_betas`` (grid s_k = ε + (1-ε)k/T), ᾱ_0 = 1,
ᾱ_k = Π_{j<=k}(1-β_j). Step k here is index t = k-1 of ``DiffusionProcess`` over the same schedule.

Posterior q(x_{k-1}|x_k, x̂0) = N(c1_k·x̂0 + c2_k·x_k, β̃_k) with c1 = β_k√ᾱ_{k-1}/(1-ᾱ_k),
c2 = (1-ᾱ_{k-1})√(1-β_k)/(1-ᾱ_k), β̃ = β_k(1-ᾱ_{k-1})/(1-ᾱ_k); at k = 1 c1 = 1, c2 = 0, β̃ = 0,
so the last step returns x̂0 exactly.
"""

from __future__ import annotations

import torch

from ldiffusion.core.errors import InputError
from ldiffusion.diffusion.noise import Gaussian, NoiseDistribution
from ldiffusion.diffusion.schedules import vp_betas

__all__ = ["VPPosterior"]


class VPPosterior:
    """Forward marginals, Markov pairs and posterior sampling for cDAL's VP schedule.

    Args:
        T: number of steps (cDAL uses 2 or 4).
        beta_min, beta_max, eps: VP SDE parameters (0.1, 20, 1e-3).
        noise: noise family (Gaussian, as in cDAL).

    Example:
        >>> p = VPPosterior(2)
        >>> round(float(p.posterior_mean_coef1[2]), 5)
        0.28035
    """

    def __init__(
        self,
        T: int,
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        eps: float = 1e-3,
        noise: NoiseDistribution | None = None,
    ) -> None:
        self.T = int(T)
        self.noise = noise if noise is not None else Gaussian()
        f64 = torch.float64
        one = torch.ones(1, dtype=f64)
        b = vp_betas(self.T, beta_min, beta_max, eps)
        # index k = 0..T; entry 0 is the clean end (β_0 = 0, ᾱ_0 = 1)
        self.betas = torch.cat([torch.zeros(1, dtype=f64), b])
        self.alphas_cumprod = torch.cat([one, torch.cumprod(1.0 - b, 0)])
        ab, ab_prev = self.alphas_cumprod[1:], self.alphas_cumprod[:-1]
        c1 = b * ab_prev.sqrt() / (1.0 - ab)
        c2 = (1.0 - ab_prev) * (1.0 - b).sqrt() / (1.0 - ab)
        var = b * (1.0 - ab_prev) / (1.0 - ab)
        zero = torch.zeros(1, dtype=f64)
        self.posterior_mean_coef1 = torch.cat([zero, c1])
        self.posterior_mean_coef2 = torch.cat([zero, c2])
        self.posterior_variance = torch.cat([zero, var])

    def _k(self, k: int | torch.Tensor, x: torch.Tensor, low: int = 1) -> torch.Tensor:
        kk = torch.as_tensor(k, dtype=torch.long).detach().cpu().reshape(-1)
        if kk.numel() == 1:
            kk = kk.expand(x.shape[0])
        if kk.numel() != x.shape[0]:
            raise InputError(f"k: expected a scalar or ({x.shape[0]},), got shape {tuple(kk.shape)}")
        if int(kk.min()) < low or int(kk.max()) > self.T:
            raise InputError(f"k: expected values in [{low}, {self.T}], got {kk.tolist()}")
        return kk

    @staticmethod
    def _at(coef: torch.Tensor, k: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return coef[k].reshape((-1,) + (1,) * (x.ndim - 1)).to(device=x.device, dtype=x.dtype)

    def _noise(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return self.noise.sample(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    def q_sample(
        self,
        x0: torch.Tensor,
        k: int | torch.Tensor,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return x_k = √ᾱ_k·x0 + √(1-ᾱ_k)·ε for k in 0..T (k = 0 returns x0)."""
        kk = self._k(k, x0, low=0)
        eps = self._noise(x0, generator) if noise is None else noise
        ab = self._at(self.alphas_cumprod, kk, x0)
        return ab.sqrt() * x0 + (1.0 - ab).sqrt() * eps

    def q_sample_pair(
        self, x0: torch.Tensor, k: int | torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return a Markov pair (x_{k-1}, x_k).

        x_{k-1} ~ q(·|x0), then x_k = √(1-β_k)·x_{k-1} + √β_k·ε' with fresh ε'.
        """
        kk = self._k(k, x0)
        x_prev = self.q_sample(x0, kk - 1, generator)
        b = self._at(self.betas, kk, x0)
        x_k = (1.0 - b).sqrt() * x_prev + b.sqrt() * self._noise(x0, generator)
        return x_prev, x_k

    def posterior_mean_variance(
        self, x0_hat: torch.Tensor, xk: torch.Tensor, k: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (c1_k·x̂0 + c2_k·x_k, β̃_k broadcastable) for k in 1..T."""
        kk = self._k(k, xk)
        mean = (
            self._at(self.posterior_mean_coef1, kk, xk) * x0_hat
            + self._at(self.posterior_mean_coef2, kk, xk) * xk
        )
        return mean, self._at(self.posterior_variance, kk, xk)

    def posterior_sample(
        self,
        x0_hat: torch.Tensor,
        xk: torch.Tensor,
        k: int | torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw x_{k-1} ~ q(x_{k-1}|x_k, x̂0); at k = 1 return x̂0 exactly (no noise)."""
        kk = self._k(k, xk)
        mean, var = self.posterior_mean_variance(x0_hat, xk, kk)
        z = self._noise(xk, generator)
        mask = (kk > 1).to(device=xk.device, dtype=xk.dtype).reshape((-1,) + (1,) * (xk.ndim - 1))
        return mean + mask * var.sqrt() * z
