"""LDSeg's Table V down-samplers: parameter-free replacements of the label and image encoders.

The paper's ablation (METHODS Part 2, Table V) replaces either learned encoder by nearest-neighbour
down-sampling to the latent size. Both return one channel, standardised per sample like
`ldiffusion.nets.ldseg.LabelEncoder`'s LayerNorm. `build_ldseg_nets` picks them with
``label_downsampler="nearest"`` / ``image_downsampler="nearest"``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ldiffusion.core.errors import InputError
from ldiffusion.nets.ldseg import LATENT_FACTOR, check_ldseg_input, ldseg_size_divisor

__all__ = ["NearestImageDownsampler", "NearestLabelDownsampler"]


def _standardise(z: Tensor, eps: float) -> Tensor:
    """Per-sample (z - mean) / sqrt(var + eps) over (C, h, w), as the label encoder's LayerNorm."""
    mean = z.mean(dim=(1, 2, 3), keepdim=True)
    var = z.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
    return (z - mean) / torch.sqrt(var + eps)


class NearestLabelDownsampler(nn.Module):
    """Table V "label down-sample": z0 = standardise(nearest-neighbour down-sampling of the label map).

    The class id (ignored pixels -> 0) is taken as one float channel, sampled at the top-left pixel
    of every s x s block (``F.interpolate(mode="nearest")`` with an integer factor picks the same
    pixel), then standardised per sample over (C, h, w) with eps 1e-3 like `LabelEncoder`; a
    constant map gives z0 = 0. No parameters. (B, H, W) int64 -> (B, 1, H/s, W/s) float32.

    Args:
        num_classes: K (ids >= K count as 0, like ignored pixels).
        latent_stride: s in (4, 8, 16).
        ignore_index: label value of unlabelled pixels.
        eps: variance epsilon of the standardisation.
    """

    def __init__(self, num_classes: int, latent_stride: int = LATENT_FACTOR, ignore_index: int = 255,
                 eps: float = 1e-3) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.stride = int(latent_stride)
        self.divisor = ldseg_size_divisor(latent_stride)
        self.ignore_index = ignore_index
        self.eps = float(eps)

    def forward(self, label: Tensor) -> Tensor:
        """Down-sample labels (B, H, W) int64 (H, W divisible by 4 s) to z0 (B, 1, H/s, W/s)."""
        if label.ndim != 3:
            raise InputError(f"NearestLabelDownsampler: expected labels (B, H, W), got {tuple(label.shape)}")
        check_ldseg_input(label.unsqueeze(1), "NearestLabelDownsampler", divisor=self.divisor)
        valid = (label != self.ignore_index) & (label >= 0) & (label < self.num_classes)
        ids = torch.where(valid, label, torch.zeros_like(label)).float().unsqueeze(1)
        return _standardise(ids[..., ::self.stride, ::self.stride], self.eps)


class NearestImageDownsampler(nn.Module):
    """Table V "image down-sample": z_i = standardise(nearest-neighbour down-sampling of the grey image).

    The channel mean of the (pre-processed) image, sampled at the top-left pixel of every s x s
    block, standardised per sample (eps 1e-3) [D]: the paper does not say how 3 channels become the
    one-channel z_i. No parameters. (B, C_in, H, W) -> (B, 1, H/s, W/s).

    Args:
        in_channels: image channels.
        latent_stride: s in (4, 8, 16).
        eps: variance epsilon of the standardisation.
    """

    def __init__(self, in_channels: int = 3, latent_stride: int = LATENT_FACTOR, eps: float = 1e-3) -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        self.stride = int(latent_stride)
        self.divisor = ldseg_size_divisor(latent_stride)
        self.eps = float(eps)

    def forward(self, x: Tensor) -> Tensor:
        """Down-sample images (B, C_in, H, W) to z_i (B, 1, H/s, W/s)."""
        check_ldseg_input(x, "NearestImageDownsampler", self.in_channels, self.divisor)
        grey = x.float().mean(dim=1, keepdim=True)
        return _standardise(grey[..., ::self.stride, ::self.stride], self.eps)
