"""Time-conditioned denoising U-Net (DDPM / improved-diffusion layout) and its presets.

`TimeUNet` predicts a tensor of the same spatial size as its input (noise, x0 or v: the method decides)
from a noisy sample ``x`` (B, C, h, w), timesteps ``t`` (B,) and optional conditioning channels
concatenated to ``x`` (e.g. LDSeg's image latent). `SegUNet` (the plain segmentation U-Net of the U-Net
baseline) lives in `ldiffusion.nets.seg_unet` and is re-exported here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ldiffusion.core.errors import ConfigError, InputError
from ldiffusion.nets.blocks import (
    Downsample,
    ResBlock,
    SelfAttention2d,
    Upsample,
    check_input_shape,
    group_norm,
    timestep_embedding,
)
from ldiffusion.nets.presets import lookup_preset
from ldiffusion.nets.seg_unet import SEG_UNET_PRESETS, SegUNet, seg_unet_preset

__all__ = ["SEG_UNET_PRESETS", "UNET_PRESETS", "SegUNet", "TimeUNet", "seg_unet_preset", "unet_preset"]

UNET_PRESETS: dict[str, dict[str, Any]] = {
    # METHODS Part 1 section 9: tiny = base 16, mult (1,2), 1 res-block, no attention.
    "tiny": {"base": 16, "mult": (1, 2), "num_res_blocks": 1, "attn_levels": (), "num_heads": 1},
    # small = base 32, mult (1,2,4), 2 res-blocks, attention at the lowest resolution (8x8 for 32x32 in).
    "small": {"base": 32, "mult": (1, 2, 4), "num_res_blocks": 2, "attn_levels": (2,), "num_heads": 1},
    # paper = SD-1.5-sized widths (320, 640, 1280, 1280), 2 res-blocks, self-attention (8 heads) at the
    # 3 lowest-resolution levels + the middle. No cross-attention. SD-1.5 itself attends at the 3 *highest*
    # resolution levels; pass attn_levels=(0, 1, 2) to copy that.
    "paper": {
        "base": 320,
        "mult": (1, 2, 4, 4),
        "num_res_blocks": 2,
        "attn_levels": (1, 2, 3),
        "num_heads": 8,
    },
}


def unet_preset(name: str) -> dict[str, Any]:
    """Return the `TimeUNet` keyword arguments of preset ``name`` ("tiny" | "small" | "paper").

    The dict omits ``in_channels`` / ``out_channels``; the caller adds them.

    Example:
        >>> TimeUNet(in_channels=4, out_channels=4, **unet_preset("tiny")).base
        16
    """
    return lookup_preset(UNET_PRESETS, "unet", name)


class TimeUNet(nn.Module):
    """Time-conditioned U-Net with residual blocks and optional self-attention.

    Layout (improved-diffusion): stem conv3x3 -> per level ``num_res_blocks`` x ResBlock (+ attention) and
    a stride-2 conv between levels -> middle ResBlock (+ attention when any level attends) + ResBlock ->
    per level (reversed) ``num_res_blocks + 1`` x [concat skip, ResBlock (+ attention)] and nearest x2 +
    conv between levels -> GN-SiLU-conv3x3 head. Time: sinusoidal embedding (width ``base``) -> Linear ->
    SiLU -> Linear (width ``4 * base``), added in every ResBlock.

    Args:
        in_channels: channels of the noisy input ``x``.
        out_channels: channels of the prediction.
        base: width of level 0.
        mult: width multiplier per level; level ``i`` has ``base * mult[i]`` channels and resolution
            ``H / 2**i``. Inputs must have H, W divisible by ``2**(len(mult) - 1)``.
        num_res_blocks: ResBlocks per level on the way down (one more on the way up).
        attn_levels: indices of the levels (0 = full resolution) that get self-attention after each ResBlock.
        cond_channels: channels of the conditioning tensor concatenated to ``x`` (0 = unconditional).
        dropout: dropout inside the ResBlocks.
        num_heads: attention heads (must divide the width of every attending level).
        max_period: ``max_period`` of the sinusoidal embedding.

    Example:
        >>> net = TimeUNet(4, 4, **unet_preset("tiny"))
        >>> net(torch.zeros(2, 4, 16, 16), torch.tensor([1, 50])).shape
        torch.Size([2, 4, 16, 16])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        base: int = 32,
        mult: tuple[int, ...] = (1, 2, 4),
        num_res_blocks: int = 2,
        attn_levels: tuple[int, ...] = (2,),
        cond_channels: int = 0,
        dropout: float = 0.0,
        num_heads: int = 1,
        max_period: float = 10000.0,
    ) -> None:
        super().__init__()
        mult = tuple(mult)
        attn_levels = tuple(attn_levels)
        if not mult or num_res_blocks < 1 or base < 1:
            raise ConfigError(
                f"TimeUNet: need a non-empty mult, num_res_blocks >= 1 and base >= 1; "
                f"got mult={mult}, num_res_blocks={num_res_blocks}, base={base}"
            )
        bad = [a for a in attn_levels if not 0 <= a < len(mult)]
        if bad:
            raise ConfigError(
                f"TimeUNet: attn_levels={attn_levels} has levels {bad} outside 0..{len(mult) - 1}"
            )
        self.in_channels, self.out_channels, self.cond_channels = in_channels, out_channels, cond_channels
        self.base, self.mult, self.attn_levels = base, mult, attn_levels
        self.divisor = 2 ** (len(mult) - 1)
        self.max_period = max_period
        temb_dim = 4 * base

        self.time_embed = nn.Sequential(nn.Linear(base, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.stem = nn.Conv2d(in_channels + cond_channels, base, 3, padding=1)

        # Encoder: a flat list of modules, each producing one skip.
        self.down = nn.ModuleList()
        skip_chs = [base]
        ch = base
        for level, m in enumerate(mult):
            out = base * m
            for _ in range(num_res_blocks):
                attn = SelfAttention2d(out, num_heads) if level in attn_levels else None
                self.down.append(_Stage(ResBlock(ch, out, temb_dim, dropout), attn))
                ch = out
                skip_chs.append(ch)
            if level != len(mult) - 1:
                self.down.append(_Stage(Downsample(ch), None))
                skip_chs.append(ch)

        mid_attn = SelfAttention2d(ch, num_heads) if attn_levels else None
        self.mid = nn.ModuleList(
            [
                _Stage(ResBlock(ch, ch, temb_dim, dropout), mid_attn),
                _Stage(ResBlock(ch, ch, temb_dim, dropout), None),
            ]
        )

        # Decoder: each ResBlock consumes one skip; an Upsample ends every level but the top one.
        self.up = nn.ModuleList()
        for level in reversed(range(len(mult))):
            out = base * mult[level]
            for i in range(num_res_blocks + 1):
                attn = SelfAttention2d(out, num_heads) if level in attn_levels else None
                up = Upsample(out) if level != 0 and i == num_res_blocks else None
                self.up.append(_Stage(ResBlock(ch + skip_chs.pop(), out, temb_dim, dropout), attn, up))
                ch = out

        self.head = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))

    def forward(self, x: Tensor, t: Tensor | float, cond: Tensor | None = None) -> Tensor:
        """Predict from a noisy sample.

        Args:
            x: noisy sample (B, in_channels, h, w), h and w divisible by ``2**(len(mult) - 1)``.
            t: timesteps (B,) int or float, or a scalar applied to the whole batch.
            cond: conditioning (B, cond_channels, h, w), required iff ``cond_channels > 0``.

        Returns:
            Prediction (B, out_channels, h, w).

        Raises:
            InputError: wrong rank, channel count, spatial size, ``t`` shape or missing/extra ``cond``.
        """
        check_input_shape(x, self.divisor, "TimeUNet", self.in_channels)
        if self.cond_channels:
            if cond is None:
                raise InputError(f"TimeUNet: built with cond_channels={self.cond_channels}; pass cond")
            if cond.shape != (x.shape[0], self.cond_channels, *x.shape[-2:]):
                raise InputError(
                    f"TimeUNet: expected cond of shape {(x.shape[0], self.cond_channels, *x.shape[-2:])}, "
                    f"got {tuple(cond.shape)}"
                )
            x = torch.cat([x, cond.to(x.dtype)], dim=1)
        elif cond is not None:
            raise InputError("TimeUNet: got cond but the net was built with cond_channels=0")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise InputError(f"TimeUNet: expected t of shape ({x.shape[0]},), got {tuple(t.shape)}")

        temb = self.time_embed(timestep_embedding(t, self.base, self.max_period).to(x.dtype))  # (B, 4*base)
        h = self.stem(x)
        skips = [h]
        for stage in self.down:
            h = stage(h, temb)
            skips.append(h)
        for stage in self.mid:
            h = stage(h, temb)
        for stage in self.up:
            h = stage(torch.cat([h, skips.pop()], dim=1), temb)
        return self.head(h)


class _Stage(nn.Module):
    """One U-Net step: a ResBlock or a Downsample, then optional attention, then optional Upsample."""

    def __init__(self, block: nn.Module, attn: nn.Module | None = None, up: nn.Module | None = None) -> None:
        super().__init__()
        self.block = block
        self.attn = attn
        self.up = up

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        x = self.block(x, temb) if isinstance(self.block, ResBlock) else self.block(x)
        if self.attn is not None:
            x = self.attn(x)
        if self.up is not None:
            x = self.up(x)
        return x
