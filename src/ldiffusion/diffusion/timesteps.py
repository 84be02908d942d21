"""Training timestep samplers (kept apart from the process, improved-diffusion ``resample.py`` style)."""

from __future__ import annotations

import torch

from ldiffusion.core.errors import ConfigError

__all__ = ["training_timesteps"]


def training_timesteps(
    batch: int,
    num_timesteps: int,
    generator: torch.Generator | None = None,
    *,
    low: int = 0,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Draw one timestep per sample, uniform on {low, ..., num_timesteps-1}.

    Args:
        batch: B.
        num_timesteps: T (exclusive upper bound).
        generator: explicit generator; draws happen on its device, then move to `device`.
        low: inclusive lower bound (0 for LDSeg, 1 for L-Diffusion's t ~ U{1..T}).
        device: output device (default: the generator's device, else CPU).

    Returns:
        int64 (B,).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> training_timesteps(4, 1000, g).shape
        torch.Size([4])
    """
    if batch < 0 or not 0 <= low < num_timesteps:
        raise ConfigError(
            f"training_timesteps: need batch >= 0 and 0 <= low < num_timesteps, "
            f"got batch={batch}, low={low}, num_timesteps={num_timesteps}"
        )
    draw_device = generator.device if generator is not None else (device or "cpu")
    t = torch.randint(low, num_timesteps, (batch,), generator=generator, device=draw_device)
    return t.to(device) if device is not None else t
