"""Building blocks shared by the nets: timestep embedding, norm factory, residual/attention/resampling blocks.

Conventions: tensors are NCHW float32 unless stated; every block follows the input's device and dtype;
no block draws random numbers. Zero-initialised layers (the second conv of a `ResBlock`, the output
projection of `SelfAttention2d`) make each block start as the identity on its residual path, as in
DDPM / improved-diffusion.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldiffusion.core.errors import InputError

__all__ = [
    "Downsample",
    "ResBlock",
    "SelfAttention2d",
    "Upsample",
    "check_input_shape",
    "group_norm",
    "num_groups",
    "timestep_embedding",
    "zero_module",
]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Embed timesteps with sinusoids (DDPM / improved-diffusion convention, ``[cos || sin]``).

    Frequencies are ``exp(-ln(max_period) * k / half)`` for ``k = 0 .. half-1`` with ``half = dim // 2``;
    an odd ``dim`` gets one trailing zero column.

    Args:
        t: timesteps (B,), int or float (raw step index or continuous time; not normalised here).
        dim: embedding width (>= 1).
        max_period: longest period of the sinusoids.

    Returns:
        Embedding (B, dim), float32 (or ``t``'s dtype when it is floating point), on ``t``'s device.

    Example:
        >>> timestep_embedding(torch.tensor([0, 10]), 8).shape
        torch.Size([2, 8])
    """
    if t.ndim != 1:
        raise InputError(f"timestep_embedding: expected t of shape (B,), got {tuple(t.shape)}")
    if dim < 1:
        raise InputError(f"timestep_embedding: dim must be >= 1, got {dim}")
    dtype = t.dtype if t.is_floating_point() else torch.float32
    half = dim // 2
    k = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * k / max(half, 1))
    args = t.to(torch.float32)[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)  # (B, 2*half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb.to(dtype)


def num_groups(channels: int, max_groups: int = 32) -> int:
    """Return the GroupNorm group count: min(max_groups, channels // 4), at least 1, dividing channels."""
    g = max(1, min(max_groups, channels // 4))
    while channels % g:
        g -= 1
    return g


def group_norm(channels: int) -> nn.GroupNorm:
    """Return ``GroupNorm(num_groups(channels), channels, eps=1e-6)`` (the norm used by all our blocks)."""
    return nn.GroupNorm(num_groups(channels), channels, eps=1e-6)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` in place and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def check_input_shape(x: Tensor, divisor: int, name: str, channels: int | None = None) -> None:
    """Raise `InputError` unless ``x`` is (B, C, H, W) with H, W divisible by ``divisor`` (smp style).

    Args:
        x: input tensor, expected (B, C, H, W).
        divisor: required divisor of H and W.
        name: the model name used in the message.
        channels: the expected C, or None to skip that check.
    """
    if x.ndim != 4:
        raise InputError(f"{name}: expected x of shape (B, C, H, W), got {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise InputError(
            f"{name}: expected x with {channels} channels (B, {channels}, H, W), got {tuple(x.shape)}"
        )
    h, w = x.shape[-2:]
    if h % divisor or w % divisor:
        ph = (h + divisor - 1) // divisor * divisor
        pw = (w + divisor - 1) // divisor * divisor
        raise InputError(
            f"{name}: expected (B, C, H, W) with H, W divisible by {divisor}, got {tuple(x.shape)}; "
            f"pad to ({ph}, {pw})"
        )


class ResBlock(nn.Module):
    """Residual block: GN-SiLU-conv3x3 (+ Linear(SiLU(temb))) -> GN-SiLU-dropout-conv3x3 (zero-init) + skip.

    The skip is a 1x1 conv when ``in_ch != out_ch``, else the identity.

    Args:
        in_ch: input channels.
        out_ch: output channels.
        temb_dim: width of the time embedding, or None for a block without time input.
        dropout: dropout probability before the second conv.
    """

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, out_ch) if temb_dim is not None else None
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        """Apply the block.

        Args:
            x: features (B, in_ch, H, W).
            temb: time embedding (B, temb_dim); required iff the block was built with ``temb_dim``.

        Returns:
            Features (B, out_ch, H, W).
        """
        h = self.conv1(F.silu(self.norm1(x)))
        if self.temb_proj is not None:
            if temb is None:
                raise InputError("ResBlock: built with temb_dim but called without temb")
            h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over the H*W positions (GN -> qkv 1x1 -> SDPA -> proj (zero-init) + x).

    Args:
        ch: channels (must be divisible by ``heads``).
        heads: number of attention heads.
    """

    def __init__(self, ch: int, heads: int = 1) -> None:
        super().__init__()
        if heads < 1 or ch % heads:
            raise ValueError(f"SelfAttention2d: ch={ch} must be divisible by heads={heads}")
        self.heads = heads
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = zero_module(nn.Conv2d(ch, ch, 1))

    def forward(self, x: Tensor) -> Tensor:
        """Attend over positions: (B, C, H, W) -> (B, C, H, W)."""
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # each (B, heads, HW, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, d)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv: (B, C, H, W) -> (B, out_ch or C, H/2, W/2)."""

    def __init__(self, ch: int, out_ch: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, out_ch or ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """Downsample x."""
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest x2 then a 3x3 conv: (B, C, H, W) -> (B, out_ch or C, 2H, 2W)."""

    def __init__(self, ch: int, out_ch: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, out_ch or ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """Upsample x."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
