"""The diffusion process: forward noising, x0/eps conversions, DDPM posterior, DDPM and DDIM steps.

Closed forms (float64 coefficients, improved-diffusion style; cast to the input's dtype/device only at
use). Index t = 0..T-1; t = -1 means the clean signal with ᾱ_{-1} := 1.

- forward marginal  x_t = √ᾱ_t·x0 + √(1-ᾱ_t)·ε, ε from the process's noise family (unit variance).
- posterior q(x_{t-1}|x_t, x0) = c1_t·x0 + c2_t·x_t (+ √β̃_t·ξ) with c1 = β_t√ᾱ_{t-1}/(1-ᾱ_t),
  c2 = √α_t(1-ᾱ_{t-1})/(1-ᾱ_t), β̃ = β_t(1-ᾱ_{t-1})/(1-ᾱ_t). Where 1-ᾱ_t = 0 (cosine t = 0) the
  posterior is the point mass x0: c1 = 1, c2 = 0, β̃ = 0.
- generalised DDIM (Song et al. eq. 12): x_{t'} = √ᾱ_{t'}·x̂0 + √(1-ᾱ_{t'}-σ²)·ε̂ + σ·ξ,
  σ = η·√((1-ᾱ_{t'})/(1-ᾱ_t))·√(1-ᾱ_t/ᾱ_{t'}); η = 1 on consecutive steps gives the DDPM σ² = β̃_t.

ξ always comes from ``self.noise`` (the same family as the forward noise; METHODS.md Part 1 §3). For a
Gaussian noise the posterior is exact; for other families it is the DDPM mean with same-family noise.
The process never imports networks: samplers take ``eps_fn(x, t_batch) -> eps_hat``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ldiffusion.core.errors import ConfigError, InputError
from ldiffusion.diffusion.noise import Gaussian, NoiseDistribution
from ldiffusion.diffusion.schedules import Schedule

logger = logging.getLogger(__name__)

__all__ = ["DiffusionProcess", "EpsFn"]

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TimeLike = int | torch.Tensor


class DiffusionProcess:
    """A discrete diffusion process over a `Schedule` with a given noise family.

    Args:
        schedule: float64 schedule (T,).
        noise: noise family for the forward process and the injected reverse noise (default Gaussian).

    Example:
        >>> from ldiffusion.diffusion import Laplace, Schedule
        >>> p = DiffusionProcess(Schedule.from_config("scaled_linear", 1000), Laplace())
        >>> p.timesteps(5, t_start=500).tolist()
        [500, 375, 250, 125, 0]
    """

    def __init__(self, schedule: Schedule, noise: NoiseDistribution | None = None) -> None:
        self.schedule = schedule
        self.noise = noise if noise is not None else Gaussian()
        f64 = torch.float64
        self.betas = schedule.betas.to(f64)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = schedule.alphas_cumprod.to(f64)
        one = torch.ones(1, dtype=f64)
        self.alphas_cumprod_prev = torch.cat([one, self.alphas_cumprod[:-1]])
        # (T+1,) table indexed by t+1 so that t = -1 -> ᾱ = 1
        self._ab_ext = torch.cat([one, self.alphas_cumprod])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).clamp(min=0).sqrt()
        one_m = 1.0 - self.alphas_cumprod
        clean = one_m <= 0
        safe = torch.where(clean, torch.ones_like(one_m), one_m)
        self.posterior_mean_coef1 = torch.where(
            clean, torch.ones_like(one_m), self.betas * self.alphas_cumprod_prev.sqrt() / safe
        )
        self.posterior_mean_coef2 = torch.where(
            clean, torch.zeros_like(one_m), self.alphas.sqrt() * (1.0 - self.alphas_cumprod_prev) / safe
        )
        self.posterior_variance = torch.where(
            clean, torch.zeros_like(one_m), self.betas * (1.0 - self.alphas_cumprod_prev) / safe
        )

    @property
    def T(self) -> int:  # noqa: N802 (paper notation)
        """Return the number of timesteps."""
        return self.schedule.T

    # ------------------------------------------------------------------ helpers
    def _as_t(self, t: TimeLike, batch: int, allow_minus_one: bool = False) -> torch.Tensor:
        """Return t as int64 (B,) on CPU, checking the range."""
        tt = torch.as_tensor(t, dtype=torch.long).detach().cpu().reshape(-1)
        if tt.numel() == 1 and batch != 1:
            tt = tt.expand(batch)
        if tt.numel() != batch:
            raise InputError(f"t: expected a scalar or ({batch},) timesteps, got shape {tuple(tt.shape)}")
        lo = -1 if allow_minus_one else 0
        if tt.numel() and (int(tt.min()) < lo or int(tt.max()) >= self.T):
            raise InputError(f"t: expected values in [{lo}, {self.T - 1}], got {tt.tolist()}")
        return tt

    @staticmethod
    def _extract(
        coef: torch.Tensor,
        t: torch.Tensor,
        shape: Sequence[int],
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
    ) -> torch.Tensor:
        """Gather float64 `coef` at `t` (B,), reshape to (B, 1, ..., 1) for `shape`, cast to dtype/device."""
        vals = coef[t.to(coef.device)]
        vals = vals.reshape((-1,) + (1,) * (len(shape) - 1))
        return vals.to(device=device, dtype=dtype)

    def _coef(self, coef: torch.Tensor, t: TimeLike, x: torch.Tensor) -> torch.Tensor:
        return self._extract(coef, self._as_t(t, x.shape[0]), x.shape, x.dtype, x.device)

    def _abar(
        self,
        t: TimeLike | None,
        x: torch.Tensor,
        alphas_cumprod: torch.Tensor | None,
        allow_minus_one: bool = False,
    ) -> torch.Tensor:
        """Return ᾱ broadcastable to x (float64 math kept until the cast), from t or an override."""
        if alphas_cumprod is not None:
            return torch.as_tensor(alphas_cumprod).to(device=x.device, dtype=x.dtype)
        if t is None:
            raise InputError("give either t or alphas_cumprod")
        tt = self._as_t(t, x.shape[0], allow_minus_one=allow_minus_one)
        return self._extract(self._ab_ext, tt + 1, x.shape, x.dtype, x.device)

    # ------------------------------------------------------------------ forward
    def add_noise(
        self,
        x0: torch.Tensor,
        noise: torch.Tensor,
        t: TimeLike | None = None,
        *,
        alphas_cumprod: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return x_t = √ᾱ·x0 + √(1-ᾱ)·noise.

        Args:
            x0: clean signal (B, ...).
            noise: unit-variance noise, same shape as x0 (from ``self.noise.sample``).
            t: timesteps (B,) int64 in [0, T) (or a scalar).
            alphas_cumprod: per-location ᾱ broadcastable to x0, e.g. (B, 1, h, w) from
                ``ComponentSchedule.alphas_cumprod_map``; replaces `t`.
        """
        if noise.shape != x0.shape:
            raise InputError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
        ab = self._abar(t, x0, alphas_cumprod)
        return ab.sqrt() * x0 + (1.0 - ab).clamp(min=0).sqrt() * noise

    def q_sample(
        self, x0: torch.Tensor, t: TimeLike, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw noise from the process's family and return (x_t, noise)."""
        noise = self.noise.sample(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return self.add_noise(x0, noise, t), noise

    def predict_x0(
        self,
        xt: torch.Tensor,
        eps: torch.Tensor,
        t: TimeLike | None = None,
        *,
        alphas_cumprod: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return x̂0 = (x_t - √(1-ᾱ_t)·ε)/√ᾱ_t."""
        ab = self._abar(t, xt, alphas_cumprod)
        return (xt - (1.0 - ab).clamp(min=0).sqrt() * eps) / ab.sqrt()

    def predict_eps(
        self,
        xt: torch.Tensor,
        x0: torch.Tensor,
        t: TimeLike | None = None,
        *,
        alphas_cumprod: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return ε = (x_t - √ᾱ_t·x0)/√(1-ᾱ_t); 0 where 1-ᾱ_t = 0 (ε not identifiable)."""
        ab = self._abar(t, xt, alphas_cumprod)
        s = (1.0 - ab).clamp(min=0).sqrt()
        eps = (xt - ab.sqrt() * x0) / torch.where(s > 0, s, torch.ones_like(s))
        return torch.where(s > 0, eps, torch.zeros_like(eps))

    # ------------------------------------------------------------------ posterior / DDPM
    def posterior_mean_variance(
        self, x0: torch.Tensor, xt: torch.Tensor, t: TimeLike
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the mean and variance of q(x_{t-1} | x_t, x0) (closed form, ᾱ_{-1} := 1).

        Returns:
            (mean like xt, variance (B, 1, ..., 1) in xt's dtype).
        """
        tt = self._as_t(t, xt.shape[0])
        c1 = self._extract(self.posterior_mean_coef1, tt, xt.shape, xt.dtype, xt.device)
        c2 = self._extract(self.posterior_mean_coef2, tt, xt.shape, xt.dtype, xt.device)
        var = self._extract(self.posterior_variance, tt, xt.shape, xt.dtype, xt.device)
        return c1 * x0 + c2 * xt, var

    def ddpm_step(
        self,
        eps_hat: torch.Tensor,
        t: TimeLike,
        xt: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Take one ancestral DDPM step t -> t-1 (σ_t² = β̃_t; no noise at t = 0).

        The injected noise is ``self.noise.sample(...)`` (unit variance, same family as the forward).
        """
        x0_hat = self.predict_x0(xt, eps_hat, t)
        mean, var = self.posterior_mean_variance(x0_hat, xt, t)
        xi = self.noise.sample(xt.shape, generator=generator, device=xt.device, dtype=xt.dtype)
        return mean + var.sqrt() * xi  # β̃_0 = 0, so t = 0 adds nothing

    # ------------------------------------------------------------------ DDIM
    def ddim_sigma(self, t: TimeLike, t_prev: TimeLike, eta: float = 0.0) -> torch.Tensor:
        """Return σ = η·√((1-ᾱ_{t'})/(1-ᾱ_t))·√(1-ᾱ_t/ᾱ_{t'}) as float64 (B,); 0 where 1-ᾱ_t = 0."""
        tt = torch.as_tensor(t, dtype=torch.long).reshape(-1).cpu()
        tp = torch.as_tensor(t_prev, dtype=torch.long).reshape(-1).cpu()
        ab_t = self._ab_ext[tt + 1]
        ab_p = self._ab_ext[tp + 1]
        one_m = 1.0 - ab_t
        safe = torch.where(one_m > 0, one_m, torch.ones_like(one_m))
        var = (1.0 - ab_p) / safe * (1.0 - ab_t / ab_p)
        var = torch.where(one_m > 0, var.clamp(min=0), torch.zeros_like(var))
        return float(eta) * var.sqrt()

    def ddim_step(
        self,
        eps_hat: torch.Tensor,
        t: TimeLike,
        t_prev: TimeLike,
        xt: torch.Tensor,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Take one generalised DDIM step t -> t_prev (t_prev = -1 means ᾱ = 1, the clean end).

        Args:
            eps_hat: predicted noise, like xt.
            t: current timestep, scalar or (B,).
            t_prev: next (smaller) timestep, scalar or (B,); -1 allowed.
            xt: current sample (B, ...).
            eta: 0 = deterministic DDIM; 1 = re-spaced DDPM.
            generator: for ξ (only drawn when eta > 0), from the process's noise family.
        """
        if eta < 0:
            raise InputError(f"eta={eta} is not valid; need eta >= 0")
        B = xt.shape[0]
        tt = self._as_t(t, B)
        tp = self._as_t(t_prev, B, allow_minus_one=True)
        if bool((tp >= tt).any()):
            raise InputError(f"t_prev must be < t, got t={tt.tolist()} t_prev={tp.tolist()}")
        ab_p = self._extract(self._ab_ext, tp + 1, xt.shape, torch.float64, xt.device)
        sigma = self._extract(
            self.ddim_sigma(tt, tp, eta), torch.arange(B), xt.shape, torch.float64, xt.device
        )
        c_x0 = ab_p.sqrt()
        c_eps = (1.0 - ab_p - sigma**2).clamp(min=0).sqrt()
        x0_hat = self.predict_x0(xt, eps_hat, tt)
        out = c_x0.to(xt.dtype) * x0_hat + c_eps.to(xt.dtype) * eps_hat
        if eta > 0:
            xi = self.noise.sample(xt.shape, generator=generator, device=xt.device, dtype=xt.dtype)
            out = out + sigma.to(xt.dtype) * xi
        return out

    # ------------------------------------------------------------------ timesteps and loop
    def timesteps(self, k: int, t_start: int | None = None) -> torch.Tensor:
        """Return k evenly spaced integer timesteps from t_start (default T-1) down to 0, inclusive.

        round(linspace(t_start, 0, k)), descending, first and last included.

        Raises:
            ConfigError: k < 2, t_start outside [1, T-1], or k > t_start+1 (repeated steps).
        """
        t_start = self.T - 1 if t_start is None else int(t_start)
        if int(k) != k or k < 2:
            raise ConfigError(
                f"k={k} is not valid; need k >= 2 (k=1 would contain only t=0 and return the input)"
            )
        if not 1 <= t_start <= self.T - 1:
            raise ConfigError(f"t_start={t_start} is not valid; need 1 <= t_start <= T-1={self.T - 1}")
        if k > t_start + 1:
            raise ConfigError(f"k={k} is larger than t_start+1={t_start + 1}; steps would repeat")
        ts = np.round(np.linspace(t_start, 0, int(k))).astype(np.int64)
        return torch.from_numpy(ts)

    def sample_loop(
        self,
        eps_fn: EpsFn,
        shape_or_xT: Sequence[int] | torch.Tensor,
        k: int,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        *,
        t_start: int | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Run generalised DDIM over ``timesteps(k, t_start)`` and return the final x (at t = -1).

        Each grid point τ_i steps to τ_{i+1}; the last point (0) steps to -1 (ᾱ = 1, σ = 0), so
        `eps_fn` is called k times. η = 1 is the re-spaced DDPM with same-family noise.

        Args:
            eps_fn: callable (x (B, ...), t (B,) int64) -> eps_hat like x.
            shape_or_xT: start tensor x_T, or a shape to draw it from ``self.noise``.
            k: number of grid points (>= 2).
            eta: DDIM η.
            generator: drives x_T (when drawn) and ξ.
            t_start: first timestep (default T-1).
            device, dtype: for a drawn x_T.
        """
        ts = self.timesteps(k, t_start)
        if isinstance(shape_or_xT, torch.Tensor):
            x = shape_or_xT
        else:
            x = self.noise.sample(tuple(shape_or_xT), generator=generator, device=device, dtype=dtype)
        B = x.shape[0]
        nxt = [*ts.tolist()[1:], -1]
        for t, tp in zip(ts.tolist(), nxt, strict=True):
            t_batch = torch.full((B,), t, dtype=torch.long, device=x.device)
            eps_hat = eps_fn(x, t_batch)
            x = self.ddim_step(eps_hat, t, tp, x, eta=eta, generator=generator)
        return x
