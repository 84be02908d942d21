"""LDSeg image encoder on a residual-encoder U-Net (``image_downsampler="resnet18"`` / ``"resnet34"``).

Not in the paper (docs/methods.md, LDSeg): the paper's image encoder (`ldiffusion.nets.ldseg.ImageEncoder`)
has four down blocks of 32-64 channels and two self-attention layers. This one replaces its body by a
`ResUNet` whose decoder stops at the latent scale 1/s and emits C_i channels (1 as in the paper unless
``image_latent_channels`` says otherwise), and keeps the paper's tail (self-attention -> SiLU ->
BatchNorm), so the conditioning z_i keeps its shape (B, C_i, H/s, W/s) and the denoiser, label encoder
and decoder are unchanged. With ``return_skips`` it also hands out its encoder features finer than 1/s,
for a label decoder with skip connections (``decoder_skips``, not in the paper).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ldiffusion.nets.ldseg import MHSA2d, check_ldseg_input, ldseg_size_divisor
from ldiffusion.nets.res_unet import FEATURE_CHANNELS, ResUNet

__all__ = ["ResNetImageEncoder"]


class ResNetImageEncoder(nn.Module):
    """Map images (B, C_in, H, W) to z_i (B, C_i, H/s, W/s) with a ResNet U-Net truncated at 1/s.

    Args:
        in_channels: image channels.
        latent_stride: s in (4, 8, 16).
        encoder: "resnet18" or "resnet34".
        out_channels: C_i (1 = the paper's one-channel z_i).

    Example:
        >>> import torch
        >>> ResNetImageEncoder(3, 8).eval()(torch.zeros(1, 3, 64, 64)).shape
        torch.Size([1, 1, 8, 8])
    """

    def __init__(self, in_channels: int = 3, latent_stride: int = 16, encoder: str = "resnet18",
                 out_channels: int = 1) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.divisor = max(ldseg_size_divisor(latent_stride), ResUNet.divisor)
        self.body = ResUNet(in_channels, out_channels, encoder, out_stride=latent_stride)
        self.out_attn = MHSA2d(out_channels, 1, groups=1)
        self.out_bn = nn.BatchNorm2d(out_channels)

        #: channels of the skip features `forward` returns with ``return_skips``, by stride (< s)
        self.skip_channels = {st: c for st, c in FEATURE_CHANNELS.items() if st < latent_stride}

    def forward(self, x: Tensor, return_skips: bool = False) -> Tensor | tuple[Tensor, dict[int, Tensor]]:
        """Encode images (B, C_in, H, W), H, W divisible by ``divisor``, into z_i (B, C_i, H/s, W/s).

        With ``return_skips`` return (z_i, {stride: encoder feature (B, skip_channels[stride], H/stride,
        W/stride)}) for the strides finer than s.
        """
        check_ldseg_input(x, "ResNetImageEncoder", self.in_channels, self.divisor)
        feats = self.body.encode(x)
        zi = self.out_bn(F.silu(self.out_attn(self.body.decode(feats))))
        if not return_skips:
            return zi
        return zi, {st: f for st, f in zip(FEATURE_CHANNELS, feats, strict=True) if st in self.skip_channels}
