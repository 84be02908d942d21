"""Residual-encoder U-Net: a ResNet-18/34 encoder (5 levels, down to 1/32) with a U-Net decoder.

The layout follows the ResNet paper (He et al. 2016: 7x7 stride-2 stem, max-pool, four stages of
basic blocks at 1/4 .. 1/32) and the decoder of the usual library U-Nets (upsample x2, concatenate
the skip of the same scale, two conv3x3-BN-ReLU; widths 256, 128, 64, 32, 16). Own code, so it
imports beside a CPU-only torch with no torchvision. Its receptive field (several hundred pixels)
is much larger than the plain `SegUNet`'s (~92 px at depth 4), which lets it use the context of a
whole 256 px crop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldiffusion.core.errors import ConfigError, InputError
from ldiffusion.nets.blocks import check_input_shape

__all__ = ["DECODER_WIDTHS", "FEATURE_CHANNELS", "RESNET_LAYERS", "ResUNet"]

#: basic blocks per stage of each encoder.
RESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
_ENC_WIDTHS = (64, 128, 256, 512)
_DEC_WIDTHS = (256, 128, 64, 32, 16)
#: output widths of the five decoder blocks (1/16 .. full resolution).
DECODER_WIDTHS = _DEC_WIDTHS
#: channels of the encoder feature at each stride (the entries of `ResUNet.encode`'s list).
FEATURE_CHANNELS: dict[int, int] = {2: 64, 4: _ENC_WIDTHS[0], 8: _ENC_WIDTHS[1], 16: _ENC_WIDTHS[2],
                                    32: _ENC_WIDTHS[3]}


def _conv_bn_relu(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch),
                         nn.ReLU(inplace=True))


class BasicBlock(nn.Module):
    """ResNet basic block: two conv3x3-BN with an identity (or 1x1 stride-s projection) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        nn.init.zeros_(self.bn2.weight)  # each block starts as the identity (Goyal et al. 2017)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_ch, H, W) -> (B, out_ch, H / stride, W / stride)."""
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x), inplace=True)


class ResUNet(nn.Module):
    """U-Net with a ResNet encoder; inputs need H, W divisible by 32.

    Args:
        in_channels: image channels.
        num_classes: output classes K.
        encoder: "resnet18" (11 M encoder parameters) or "resnet34".
        out_stride: output resolution 1/out_stride (1, 2, 4, 8 or 16): the decoder stops after the
            block of that scale (used by encoders that feed a latent, such as LDSeg's image encoder).

    Example:
        >>> ResUNet(3, 2)(torch.zeros(1, 3, 64, 64)).shape
        torch.Size([1, 2, 64, 64])
    """

    divisor = 32

    def __init__(self, in_channels: int = 3, num_classes: int = 2, encoder: str = "resnet18",
                 out_stride: int = 1) -> None:
        super().__init__()
        if out_stride not in (1, 2, 4, 8, 16):
            raise ConfigError(f"ResUNet: out_stride={out_stride} should be one of [1, 2, 4, 8, 16]")
        self.out_stride = out_stride
        if encoder not in RESNET_LAYERS:
            raise ConfigError(f"encoder={encoder!r} is not valid; choose one of {sorted(RESNET_LAYERS)}")
        if num_classes < 1:
            raise ConfigError(f"ResUNet: num_classes={num_classes} should be >= 1")
        self.in_channels, self.num_classes = in_channels, num_classes
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False),
                                  nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        stages, ch = [], 64
        for i, (n, width) in enumerate(zip(RESNET_LAYERS[encoder], _ENC_WIDTHS, strict=True)):
            blocks = [BasicBlock(ch, width, stride=1 if i == 0 else 2)]
            blocks += [BasicBlock(width, width) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            ch = width
        self.stages = nn.ModuleList(stages)
        # skips at 1/16, 1/8, 1/4, 1/2 and none at full resolution
        skips = (_ENC_WIDTHS[2], _ENC_WIDTHS[1], _ENC_WIDTHS[0], 64, 0)
        n_dec = 5 - out_stride.bit_length() + 1
        dec, ch = [], _ENC_WIDTHS[3]
        for skip, width in zip(skips[:n_dec], _DEC_WIDTHS[:n_dec], strict=True):
            dec.append(nn.Sequential(_conv_bn_relu(ch + skip, width), _conv_bn_relu(width, width)))
            ch = width
        self.decoder = nn.ModuleList(dec)
        self.head = nn.Conv2d(ch, num_classes, 3, padding=1)

    def forward(self, x: Tensor, film: list[tuple[Tensor, Tensor]] | None = None) -> Tensor:
        """Segment images.

        Args:
            x: images (B, in_channels, H, W), H and W divisible by 32.
            film: optional feature-wise modulation of the decoder (used by conditional nets such as
                cDAL's generator): one (scale, shift) pair of shape (B, DECODER_WIDTHS[i]) per decoder
                block i; its output y becomes y * (1 + scale) + shift.

        Returns:
            logits (B, num_classes, H / out_stride, W / out_stride).
        """
        return self.decode(self.encode(x), film)

    def encode(self, x: Tensor) -> list[Tensor]:
        """Return the encoder features of images (B, C_in, H, W) at 1/2, 1/4, 1/8, 1/16 and 1/32
        (channels `FEATURE_CHANNELS`)."""
        check_input_shape(x, self.divisor, "ResUNet", self.in_channels)
        feats = [self.stem(x)]  # 1/2
        y = self.pool(feats[0])
        for stage in self.stages:
            y = stage(y)
            feats.append(y)  # 1/4, 1/8, 1/16, 1/32
        return feats

    def decode(self, feats: list[Tensor], film: list[tuple[Tensor, Tensor]] | None = None) -> Tensor:
        """Return logits (B, K, H / out_stride, W / out_stride) from `encode`'s features (see `forward`)."""
        y = feats[4]
        skips = [feats[3], feats[2], feats[1], feats[0], None]
        if film is not None and len(film) != len(self.decoder):
            raise InputError(f"ResUNet: film needs {len(self.decoder)} (scale, shift) pairs, got {len(film)}")
        for i, (block, skip) in enumerate(zip(self.decoder, skips[: len(self.decoder)], strict=True)):
            y = F.interpolate(y, scale_factor=2.0, mode="nearest")
            if skip is not None:
                y = torch.cat([y, skip], dim=1)
            y = block(y)
            if film is not None:
                scale, shift = film[i]
                y = y * (1.0 + scale[:, :, None, None].to(y.dtype)) + shift[:, :, None, None].to(y.dtype)
        return self.head(y)
