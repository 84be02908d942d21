"""Convolutional (KL-)autoencoder for latent diffusion, and an adapter for a local diffusers `AutoencoderKL`.

Conventions (both the own `Autoencoder` and `DiffusersAutoencoder`):

* images enter ``encode`` in [-1, 1] (SD-VAE convention; map a [0, 1] tile with ``2 * x - 1``);
* ``encode`` / ``decode`` work on the *unscaled* latent. The latent scale ``s = scaling_factor`` is applied
  by the caller, diffusers style: ``z0 = s * encode(x).mean`` and ``x = decode(z / s)``;
* ``decode`` returns images in [-1, 1]: the own autoencoder ends in ``tanh`` (smooth, so gradients flow
  through every decoded pixel, which L-Diffusion's contrastive loss needs); the diffusers adapter clamps,
  as the SD pipelines do.

Down-factor convention of `Autoencoder`: a 3x3 stem at full resolution, then one level per entry of
``channels``, each ending with a stride-2 conv, so ``f = 2 ** len(channels)`` (``(8, 16)`` -> f = 4,
``(16, 32, 64)`` -> f = 8).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldiffusion.core.errors import CheckpointError, ConfigError, LDiffusionError
from ldiffusion.nets.blocks import Downsample, ResBlock, Upsample, check_input_shape, group_norm
from ldiffusion.nets.presets import lookup_preset

logger = logging.getLogger(__name__)

__all__ = [
    "AUTOENCODER_PRESETS",
    "Autoencoder",
    "DiagonalGaussian",
    "DiffusersAutoencoder",
    "autoencoder_preset",
    "load_diffusers_autoencoder",
]

AUTOENCODER_PRESETS: dict[str, dict[str, Any]] = {
    # METHODS Part 1 section 9.
    "tiny": {"latent_channels": 4, "channels": (8, 16), "num_res_blocks": 1},  # f = 4
    "small": {"latent_channels": 4, "channels": (16, 32, 64), "num_res_blocks": 1},  # f = 8
}


def autoencoder_preset(name: str) -> dict[str, Any]:
    """Return the `Autoencoder` keyword arguments of preset ``name`` ("tiny" f=4 | "small" f=8).

    The ``paper`` setting is the SD-1.5 VAE, loaded with `load_diffusers_autoencoder`.
    """
    return lookup_preset(AUTOENCODER_PRESETS, "autoencoder", name)


class DiagonalGaussian:
    """Diagonal Gaussian posterior N(mean, exp(logvar)) over latents (B, c, h, w).

    ``logvar=None`` makes a point mass (deterministic autoencoder): ``sample`` returns the mean and
    ``kl`` is zero.

    Args:
        mean: (B, c, h, w).
        logvar: (B, c, h, w) or None; clamped to [-30, 20] as in the SD VAE.
    """

    def __init__(self, mean: Tensor, logvar: Tensor | None = None) -> None:
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0) if logvar is not None else None

    @property
    def std(self) -> Tensor:
        """Standard deviation (B, c, h, w) (zeros for a point mass)."""
        if self.logvar is None:
            return torch.zeros_like(self.mean)
        return torch.exp(0.5 * self.logvar)

    def mode(self) -> Tensor:
        """Return the mean (B, c, h, w)."""
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``mean + std * eps`` with ``eps ~ N(0, I)`` from ``generator`` (on the mean's device).

        Returns:
            Latent sample (B, c, h, w).
        """
        if self.logvar is None:
            return self.mean
        eps = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample, summed over (c, h, w): shape (B,)."""
        if self.logvar is None:
            return self.mean.new_zeros(self.mean.shape[0])
        kl = 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)
        return kl.flatten(1).sum(dim=1)


class Autoencoder(nn.Module):
    """VAE-style conv autoencoder: (B, C, H, W) in [-1, 1] <-> latent (B, c, H/f, W/f), f = 2**len(channels).

    Encoder: stem conv3x3 -> per level ``num_res_blocks`` x ResBlock(channels[i]) + stride-2 conv ->
    mid ResBlock -> GN-SiLU-conv3x3 -> (mean, logvar) (2c channels; c when ``kl=False``).
    Decoder mirrors it: conv3x3 -> mid ResBlock -> per level (reversed) nearest x2 + conv, ResBlocks ->
    GN-SiLU-conv3x3 -> tanh.

    Args:
        in_channels: image channels C.
        latent_channels: latent channels c.
        channels: widths per level (also sets f).
        num_res_blocks: ResBlocks per level.
        kl: True for a KL-regularised VAE (mean and log-variance), False for a plain autoencoder.
        kl_weight: weight of the KL term in `loss`.

    Attributes:
        scaling_factor: latent scale s (float, default 1.0). Training sets it to ``1 / std`` of the
            encoded training latents; it is a persistent buffer, so it is saved with the weights.

    Example:
        >>> ae = Autoencoder(**autoencoder_preset("tiny"))
        >>> ae.encode(torch.zeros(1, 3, 64, 64)).mean.shape
        torch.Size([1, 4, 16, 16])
    """

    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 4,
        channels: tuple[int, ...] = (16, 32, 64),
        num_res_blocks: int = 1,
        kl: bool = True,
        kl_weight: float = 1e-6,
    ) -> None:
        super().__init__()
        channels = tuple(channels)
        if not channels or num_res_blocks < 1 or latent_channels < 1:
            raise ConfigError(
                f"Autoencoder: need non-empty channels, num_res_blocks >= 1, latent_channels >= 1; got "
                f"channels={channels}, num_res_blocks={num_res_blocks}, latent_channels={latent_channels}"
            )
        self.in_channels, self.latent_channels, self.channels = in_channels, latent_channels, channels
        self.is_kl, self.kl_weight = kl, kl_weight
        self.downsample_factor = 2 ** len(channels)
        self.register_buffer("_scaling_factor", torch.tensor(1.0))

        enc: list[nn.Module] = [nn.Conv2d(in_channels, channels[0], 3, padding=1)]
        ch = channels[0]
        for out in channels:
            for _ in range(num_res_blocks):
                enc.append(ResBlock(ch, out))
                ch = out
            enc.append(Downsample(ch))
        enc += [ResBlock(ch, ch), group_norm(ch), nn.SiLU()]
        enc.append(nn.Conv2d(ch, 2 * latent_channels if kl else latent_channels, 3, padding=1))
        self.encoder = nn.Sequential(*enc)

        dec: list[nn.Module] = [nn.Conv2d(latent_channels, ch, 3, padding=1), ResBlock(ch, ch)]
        for out in reversed(channels):
            dec.append(Upsample(ch))
            for _ in range(num_res_blocks):
                dec.append(ResBlock(ch, out))
                ch = out
        dec += [group_norm(ch), nn.SiLU(), nn.Conv2d(ch, in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    @property
    def scaling_factor(self) -> float:
        """Latent scale s: the diffusion model sees ``s * encode(x).mean``."""
        return float(self._scaling_factor)

    @scaling_factor.setter
    def scaling_factor(self, value: float) -> None:
        if not value > 0:
            raise ConfigError(f"Autoencoder.scaling_factor must be > 0, got {value}")
        self._scaling_factor.fill_(float(value))

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Encode images.

        Args:
            x: images (B, in_channels, H, W) in [-1, 1], H and W divisible by ``downsample_factor``.

        Returns:
            Posterior over unscaled latents (B, latent_channels, H/f, W/f).
        """
        check_input_shape(x, self.downsample_factor, "Autoencoder.encode", self.in_channels)
        h = self.encoder(x)
        if self.is_kl:
            mean, logvar = h.chunk(2, dim=1)
            return DiagonalGaussian(mean, logvar)
        return DiagonalGaussian(h)

    def decode(self, z: Tensor) -> Tensor:
        """Decode latents (B, latent_channels, h, w) to images (B, in_channels, f*h, f*w) in (-1,1)."""
        check_input_shape(z, 1, "Autoencoder.decode", self.latent_channels)
        return torch.tanh(self.decoder(z))

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Reconstruct: decode a posterior sample of ``encode(x)``; (B, C, H, W) -> (B, C, H, W)."""
        return self.decode(self.encode(x).sample(generator))

    def loss(self, x: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Compute the training loss on images ``x`` (B, C, H, W) in [-1, 1].

        Returns:
            ``recon`` = mean L1 + mean MSE of the reconstruction of a posterior sample,
            ``kl`` = batch mean of the per-sample KL (summed over latent elements; 0 when ``kl=False``),
            ``total`` = ``recon + kl_weight * kl``. All scalars.
        """
        posterior = self.encode(x)
        x_rec = self.decode(posterior.sample(generator))
        recon = F.l1_loss(x_rec, x) + F.mse_loss(x_rec, x)
        kl = posterior.kl().mean()
        return {"recon": recon, "kl": kl, "total": recon + self.kl_weight * kl}


class DiffusersAutoencoder(nn.Module):
    """Adapter giving a diffusers ``AutoencoderKL`` the `Autoencoder` interface.

    ``encode(x).mean`` (unscaled latent), ``decode(z)`` clamped to [-1, 1], ``scaling_factor`` from the
    model config (0.18215 when absent, the SD-1.x value),
    ``downsample_factor = 2**(len(block_out_channels) - 1)``.
    """

    def __init__(self, vae: nn.Module, scaling_factor: float | None = None) -> None:
        super().__init__()
        self.vae = vae
        config = vae.config
        sf = config.get("scaling_factor") if scaling_factor is None else scaling_factor
        self.scaling_factor = float(sf if sf is not None else 0.18215)
        self.in_channels = int(config.get("in_channels", 3))
        self.latent_channels = int(config.get("latent_channels", 4))
        self.downsample_factor = 2 ** (len(config.get("block_out_channels", (64,))) - 1)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Encode images (B, C, H, W) in [-1, 1] to a posterior over unscaled latents (B, c, H/f, W/f)."""
        check_input_shape(x, self.downsample_factor, "DiffusersAutoencoder.encode", self.in_channels)
        dist = self.vae.encode(x).latent_dist
        return DiagonalGaussian(dist.mean, dist.logvar)

    def decode(self, z: Tensor) -> Tensor:
        """Decode unscaled latents (B, c, h, w) to images (B, C, f*h, f*w) clamped to [-1, 1]."""
        check_input_shape(z, 1, "DiffusersAutoencoder.decode", self.latent_channels)
        return self.vae.decode(z).sample.clamp(-1.0, 1.0)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Reconstruct: decode a posterior sample of ``encode(x)``."""
        return self.decode(self.encode(x).sample(generator))


def load_diffusers_autoencoder(
    folder: str | os.PathLike[str], *, scaling_factor: float | None = None, dtype: torch.dtype = torch.float32
) -> DiffusersAutoencoder:
    """Load a local diffusers ``AutoencoderKL`` folder (e.g. SD-1.5's ``vae/``), frozen, in eval mode.

    Needs the optional ``diffusers`` package. Nothing is downloaded (``local_files_only=True``).

    Args:
        folder: directory with ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or ``.bin``).
        scaling_factor: override for the config's ``scaling_factor``.
        dtype: parameter dtype (float32 by default).

    Returns:
        A `DiffusersAutoencoder` on CPU with ``requires_grad=False`` parameters.

    Raises:
        LDiffusionError: ``diffusers`` is not installed.
        CheckpointError: the folder or its ``config.json`` is missing, or diffusers cannot load it.
    """
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise LDiffusionError(
            "loading a diffusers AutoencoderKL needs the 'diffusers' extra: "
            'pip install "ldiffusion[diffusers]" '
            f"(import failed: {e})"
        ) from e
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"{folder}: not a diffusers AutoencoderKL folder (expected config.json and "
            "diffusion_pytorch_model.safetensors)"
        )
    try:
        vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{folder}: diffusers could not load an AutoencoderKL ({e})") from e
    vae.eval().requires_grad_(False)
    logger.info("loaded diffusers AutoencoderKL from %s", folder)
    return DiffusersAutoencoder(vae, scaling_factor)
