"""Plain segmentation U-Net (Ronneberger layout, BN + ReLU double convs) for the U-Net baseline method."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ldiffusion.core.errors import ConfigError
from ldiffusion.nets.blocks import check_input_shape
from ldiffusion.nets.presets import lookup_preset

__all__ = ["SEG_UNET_PRESETS", "SegUNet", "seg_unet_preset"]

SEG_UNET_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"base": 8, "depth": 3},
    "small": {"base": 32, "depth": 4},
    # The original U-Net widths (64 .. 1024), 31 M parameters: the same order as a ResNet18/34 U-Net.
    "paper": {"base": 64, "depth": 5},
}


def seg_unet_preset(name: str) -> dict[str, Any]:
    """Return the `SegUNet` keyword arguments of preset ``name`` ("tiny" | "small" | "paper")."""
    return lookup_preset(SEG_UNET_PRESETS, "seg_unet", name)


def _double_conv(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class SegUNet(nn.Module):
    """Segmentation U-Net: ``depth`` levels of (conv3x3-BN-ReLU) x 2, max-pool down, transposed-conv up.

    Level ``i`` has ``base * 2**i`` channels at resolution ``H / 2**i``; inputs need H, W divisible by
    ``2**(depth - 1)``.

    Args:
        in_channels: image channels.
        num_classes: output classes K (incl. background).
        base: width of level 0.
        depth: number of levels (>= 2).

    Example:
        >>> SegUNet(3, 2, base=8, depth=3)(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 2, 32, 32])
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 2, base: int = 32, depth: int = 4) -> None:
        super().__init__()
        if depth < 2 or base < 1 or num_classes < 1:
            raise ConfigError(
                f"SegUNet: need depth >= 2, base >= 1, num_classes >= 1; got depth={depth}, base={base}, "
                f"num_classes={num_classes}"
            )
        self.in_channels, self.num_classes, self.depth = in_channels, num_classes, depth
        self.divisor = 2 ** (depth - 1)
        chs = [base * 2**i for i in range(depth)]
        self.enc = nn.ModuleList([_double_conv(in_channels, chs[0])])
        self.enc.extend(_double_conv(chs[i - 1], chs[i]) for i in range(1, depth))
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(chs[i], chs[i - 1], 2, stride=2) for i in range(depth - 1, 0, -1)
        )
        self.dec = nn.ModuleList(_double_conv(2 * chs[i - 1], chs[i - 1]) for i in range(depth - 1, 0, -1))
        self.head = nn.Conv2d(chs[0], num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Segment images.

        Args:
            x: images (B, in_channels, H, W), H and W divisible by ``2**(depth - 1)``.

        Returns:
            Logits (B, num_classes, H, W).
        """
        check_input_shape(x, self.divisor, "SegUNet", self.in_channels)
        skips = []
        h = x
        for i, block in enumerate(self.enc):
            h = block(h if i == 0 else self.pool(h))
            skips.append(h)
        skips.pop()
        for up, dec in zip(self.up, self.dec, strict=True):
            h = dec(torch.cat([up(h), skips.pop()], dim=1))
        return self.head(h)
