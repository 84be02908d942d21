"""Working resolution (`input_scale`): one resizing rule for training arrays and prediction tensors.

Images are resized with antialiased bilinear interpolation (`torch.nn.functional.interpolate`,
``antialias=True``), class and instance maps with nearest neighbour, probabilities back to the input
size with plain bilinear interpolation. Training (`SegmentationDataset(scale=...)`) and prediction
(`methods.sliding.sliding_window_proba`) call the same functions, so a model sees the same pixels
in both.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["resize_image", "resize_maps", "resize_maps_to", "resize_proba", "scaled_size"]


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """Return the (height, width) of an image resized by `scale` (rounded, at least 1 px each).

    Example:
        >>> scaled_size(522, 775, 0.5)
        (261, 388)
    """
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_image(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize images (B, C, H, W) float to `size` (h, w): antialiased bilinear, float32 out."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x.float()
    return F.interpolate(x.float(), size=size, mode="bilinear", antialias=True, align_corners=False)


def resize_proba(p: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize class probabilities (B, K, h, w) back to `size` (H, W): bilinear, renormalised over K."""
    if tuple(p.shape[-2:]) == tuple(size):
        return p
    out = F.interpolate(p.float(), size=size, mode="bilinear", align_corners=False)
    return out / out.sum(1, keepdim=True).clamp_min(1e-12)


def resize_maps(image: np.ndarray, label: np.ndarray, inst: np.ndarray | None,
                scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Resize one training sample by `scale`: image (H, W, 3) uint8, label and inst (H, W) any int.

    The image goes through `resize_image` and is rounded back to uint8; label and instance ids are
    sampled by nearest neighbour (no new ids or classes appear). `scale == 1` returns the inputs.
    """
    if scale == 1.0:
        return image, label, inst
    return resize_maps_to(image, label, inst, scaled_size(label.shape[0], label.shape[1], scale))


def resize_maps_to(image: np.ndarray, label: np.ndarray, inst: np.ndarray | None,
                   size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """`resize_maps` to an exact (height, width) `size`; the inputs come back unchanged at that size."""
    if tuple(label.shape) == tuple(size):
        return image, label, inst
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
    small = resize_image(x, size)[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()

    def nearest(a: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(a.astype(np.int64))[None, None].double()  # exact for ids < 2**53
        return F.interpolate(t, size=size, mode="nearest")[0, 0].numpy().astype(a.dtype)

    return np.ascontiguousarray(small), nearest(label), (nearest(inst) if inst is not None else None)
