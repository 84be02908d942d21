"""Paired image / mask augmentation driven by an explicit `torch.Generator`.

Geometric operations (crop, pad, flips, 90-degree rotations) are exact pixel permutations, so
labels and instance maps keep their value set. The optional scale jitter resizes the crop (image
bilinear, masks nearest neighbour), so masks still take no new values. Stain (H&E) and colour
jitter touch the image only.

Arrays are numpy, channels last: image (H, W, 3) uint8, label (H, W) integer class ids,
inst (H, W) integer instance ids. The same generator state gives the same output.

Example:
    >>> import numpy as np, torch
    >>> t = TrainTransform(crop_px=32, flips=True, rot90=True)
    >>> img, lab, inst = t(np.zeros((40, 40, 3), np.uint8), np.zeros((40, 40), np.uint8),
    ...                    generator=torch.Generator().manual_seed(0))
    >>> img.shape, lab.shape, inst is None
    ((32, 32, 3), (32, 32), True)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Literal

import numpy as np
import torch

from ldiffusion.core.config import Config, check_range
from ldiffusion.core.errors import ConfigError, InputError
from ldiffusion.data.resample import resize_maps, resize_maps_to

logger = logging.getLogger(__name__)

PadMode = Literal["reflect", "constant"]


def _randint(high: int, generator: torch.Generator) -> int:
    """Draw an integer uniformly from [0, high) with `generator`."""
    return int(torch.randint(0, max(int(high), 1), (1,), generator=generator).item())


def _uniform(lo: float, hi: float, generator: torch.Generator) -> float:
    """Draw a float uniformly from [lo, hi) with `generator`."""
    return lo + (hi - lo) * float(torch.rand((), generator=generator).item())


def pad_to(
    image: np.ndarray,
    label: np.ndarray,
    inst: np.ndarray | None,
    size_px: int,
    *,
    ignore_index: int = 255,
    pad_mode: PadMode = "reflect",
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Pad all arrays (centred) so that both sides are at least `size_px`.

    The image is padded by reflection (or zeros with `pad_mode="constant"`), the label with
    `ignore_index` and the instance map with 0 (no object).

    Args:
        image: (H, W, 3).
        label: (H, W).
        inst: (H, W) or None.
        size_px: minimum side after padding.
        ignore_index: label value of padded pixels.
        pad_mode: "reflect" or "constant" (zeros) for the image.

    Returns:
        (image, label, inst), unchanged when already large enough.
    """
    h, w = label.shape
    dh, dw = max(size_px - h, 0), max(size_px - w, 0)
    if dh == 0 and dw == 0:
        return image, label, inst
    pads = ((dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2))
    image = np.pad(image, (*pads, (0, 0)), mode=pad_mode)
    label = np.pad(label, pads, mode="constant", constant_values=ignore_index)
    if inst is not None:
        inst = np.pad(inst, pads, mode="constant", constant_values=0)
    return image, label, inst


def random_crop(
    image: np.ndarray,
    label: np.ndarray,
    inst: np.ndarray | None,
    crop_px: int,
    *,
    generator: torch.Generator,
    ignore_index: int = 255,
    pad_mode: PadMode = "reflect",
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Crop a random `crop_px` square (padding first when a side is smaller).

    Args:
        image: (H, W, 3).
        label: (H, W).
        inst: (H, W) or None.
        crop_px: side of the crop in pixels (> 0).
        generator: source of the crop offset.
        ignore_index: label value of padded pixels.
        pad_mode: image padding, "reflect" or "constant" (zeros).

    Returns:
        (image (crop_px, crop_px, 3), label (crop_px, crop_px), inst (crop_px, crop_px) or None).
    """
    image, label, inst = pad_to(image, label, inst, crop_px, ignore_index=ignore_index, pad_mode=pad_mode)
    h, w = label.shape
    y = _randint(h - crop_px + 1, generator)
    x = _randint(w - crop_px + 1, generator)
    sl = (slice(y, y + crop_px), slice(x, x + crop_px))
    return image[sl], label[sl], (inst[sl] if inst is not None else None)


#: Ruifrok-Johnston stain vectors (haematoxylin, eosin, DAB), as `skimage.color.rgb_from_hed`.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)
_LOG_FLOOR = np.log(1e-6)  # skimage's scale: densities = log(rgb) / log(1e-6) @ hed_from_rgb


def hed_perturb(image: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Scale and shift the haematoxylin, eosin and DAB densities of an RGB image.

    Densities follow `skimage.color.rgb2hed` (optical density / -log(1e-6) projected on the
    Ruifrok-Johnston stain vectors) but are not clipped at 0, so `scale = 1, shift = 0` maps the
    image back to itself (up to uint8 rounding).

    Args:
        image: (H, W, 3) uint8 RGB.
        scale: (3,) factor per stain (H, E, D).
        shift: (3,) offset per stain, in rgb2hed density units (MoNuSeg's mean H density is ~0.035).

    Returns:
        (H, W, 3) uint8.
    """
    x = np.maximum(image.astype(np.float64) / 255.0, 1e-6)
    hed = (np.log(x) / _LOG_FLOOR) @ _HED_FROM_RGB
    hed = hed * np.asarray(scale, dtype=np.float64) + np.asarray(shift, dtype=np.float64)
    rgb = np.exp((hed @ _RGB_FROM_HED) * _LOG_FLOOR)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def stain_jitter(image: np.ndarray, strength: float, bias: float, *,
                 generator: torch.Generator) -> np.ndarray:
    """H&E stain augmentation (Tellez et al. 2019): random per-stain scale and shift of HED densities.

    For each of the three stains a factor is drawn uniformly from [1 - strength, 1 + strength] and
    an offset from [-bias, bias] (`hed_perturb`). This mimics staining and scanner differences
    between labs, which brightness/hue jitter alone does not.

    Args:
        image: (H, W, 3) uint8 RGB.
        strength: scale range in [0, 1); 0 with `bias` 0 returns the image unchanged (no draws).
        bias: shift range (>= 0) in rgb2hed density units.
        generator: source of the six draws.

    Returns:
        (H, W, 3) uint8.
    """
    if strength <= 0 and bias <= 0:
        return image
    scale = np.array([_uniform(1 - strength, 1 + strength, generator) for _ in range(3)])
    shift = np.array([_uniform(-bias, bias, generator) for _ in range(3)])
    return hed_perturb(image, scale, shift)


def color_jitter(image: np.ndarray, strength: float, *, generator: torch.Generator) -> np.ndarray:
    """Randomly change brightness, contrast, saturation and hue of an RGB image.

    Factors are drawn uniformly from [1 - s, 1 + s] (brightness, contrast, saturation) and the hue
    is rotated by an angle in [-s, s] * 60 degrees in YIQ chroma space.

    Args:
        image: (H, W, 3) uint8.
        strength: s in [0, 1]; 0 returns the image unchanged (no draws are made).
        generator: source of the four factors.

    Returns:
        (H, W, 3) uint8.
    """
    if strength <= 0:
        return image
    s = float(strength)
    b = _uniform(1 - s, 1 + s, generator)
    c = _uniform(1 - s, 1 + s, generator)
    sat = _uniform(1 - s, 1 + s, generator)
    hue = _uniform(-s, s, generator) * np.pi / 3
    x = image.astype(np.float32) / 255.0
    x = x * b
    grey = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    x = (x - grey.mean()) * c + grey.mean()
    grey = (x @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
    x = (x - grey) * sat + grey
    # hue: rotate the I/Q chroma plane
    to_yiq = np.array(
        [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=np.float32
    )
    rot = np.array(
        [[1, 0, 0], [0, np.cos(hue), -np.sin(hue)], [0, np.sin(hue), np.cos(hue)]], dtype=np.float32
    )
    m = np.linalg.inv(to_yiq) @ rot @ to_yiq
    x = x @ m.T.astype(np.float32)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainTransform(Config):
    """Training augmentation: random crop, scale jitter, flips, 90-degree rotations, colour jitter.

    Attributes:
        crop_px: side of the random square crop, or None to keep the full image.
        scale_jitter: magnification jitter j in [0, 1] (0 = off): each sample is resized by a factor
            s drawn log-uniformly from [1 / (1 + j), 1 + j], so objects appear up to (1 + j) times
            larger or smaller, as on a slide scanned at another resolution. With `crop_px` the crop
            is cut at side round(crop_px / s) and resized to `crop_px`.
        flips: random horizontal and vertical flips (p = 0.5 each).
        rot90: random rotation by k * 90 degrees, k uniform in {0, 1, 2, 3}.
        color_jitter: jitter strength in [0, 1] for the image only (0 = off).
        stain_jitter: H&E density scale range in [0, 1) (`stain_jitter`; 0 = off).
        stain_bias: H&E density shift range (>= 0, rgb2hed units; 0 = off).
        ignore_index: label value of padded pixels.
        pad_mode: image padding when the image is smaller than `crop_px`.
    """

    crop_px: int | None = None
    scale_jitter: float = 0.0
    flips: bool = True
    rot90: bool = True
    color_jitter: float = 0.0
    stain_jitter: float = 0.0
    stain_bias: float = 0.0
    ignore_index: int = 255
    pad_mode: PadMode = "reflect"

    def __post_init__(self) -> None:
        if self.crop_px is not None and self.crop_px < 1:
            raise ConfigError(
                f"crop_px={self.crop_px!r} is out of range; expected a positive integer or None"
            )
        check_range("scale_jitter", self.scale_jitter, 0.0, 1.0)
        check_range("color_jitter", self.color_jitter, 0.0, 1.0)
        check_range("stain_jitter", self.stain_jitter, 0.0, 0.99)
        check_range("stain_bias", self.stain_bias, 0.0, 1.0)
        if self.pad_mode not in ("reflect", "constant"):
            raise ConfigError(
                f"pad_mode={self.pad_mode!r} is not valid; choose one of ['constant', 'reflect']"
            )

    def __call__(
        self,
        image: np.ndarray,
        label: np.ndarray,
        inst: np.ndarray | None = None,
        *,
        generator: torch.Generator,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Augment one sample.

        Args:
            image: (H, W, 3) uint8.
            label: (H, W) integer class ids.
            inst: (H, W) integer instance ids, or None.
            generator: source of every random draw (same state -> same output).

        Returns:
            (image, label, inst) as contiguous arrays with the same dtypes; spatial size
            (crop_px, crop_px) when `crop_px` is set, else (H, W) (times the drawn scale with
            `scale_jitter`) or its transpose after a rotation.

        Raises:
            InputError: the arrays have mismatched sizes.
        """
        if (
            image.ndim != 3
            or image.shape[:2] != label.shape
            or (inst is not None and inst.shape != label.shape)
        ):
            raise InputError(
                f"expected image (H, W, 3), label (H, W) and inst (H, W) of equal H, W; got {image.shape}, "
                f"{label.shape}, {None if inst is None else inst.shape}"
            )
        scale = self._draw_scale(generator)
        if self.crop_px is not None:
            side = self.crop_px if scale == 1.0 else max(1, round(self.crop_px / scale))
            image, label, inst = random_crop(
                image,
                label,
                inst,
                side,
                generator=generator,
                ignore_index=self.ignore_index,
                pad_mode=self.pad_mode,
            )
            image, label, inst = resize_maps_to(image, label, inst, (self.crop_px, self.crop_px))
        elif scale != 1.0:
            image, label, inst = resize_maps(image, label, inst, scale)
        if self.flips:
            for axis in (0, 1):
                if _randint(2, generator):
                    image, label = np.flip(image, axis), np.flip(label, axis)
                    inst = np.flip(inst, axis) if inst is not None else None
        if self.rot90:
            k = _randint(4, generator)
            if k:
                image, label = np.rot90(image, k, axes=(0, 1)), np.rot90(label, k, axes=(0, 1))
                inst = np.rot90(inst, k, axes=(0, 1)) if inst is not None else None
        if self.stain_jitter > 0 or self.stain_bias > 0:
            image = stain_jitter(image, self.stain_jitter, self.stain_bias, generator=generator)
        if self.color_jitter > 0:
            image = color_jitter(image, self.color_jitter, generator=generator)
        return (
            np.ascontiguousarray(image),
            np.ascontiguousarray(label),
            np.ascontiguousarray(inst) if inst is not None else None,
        )

    def _draw_scale(self, generator: torch.Generator) -> float:
        """Return the resize factor of one sample: 1 when `scale_jitter` is 0 (no draw), else
        log-uniform in [1 / (1 + j), 1 + j]."""
        if self.scale_jitter <= 0:
            return 1.0
        bound = math.log1p(self.scale_jitter)
        return math.exp(_uniform(-bound, bound, generator))
