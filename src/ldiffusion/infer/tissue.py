"""Tissue detection at low magnification: Otsu on HSV saturation plus morphological clean-up.

Glass is bright and grey (low saturation), stained tissue is coloured. The threshold is Otsu's on
the (slightly smoothed) thumbnail's saturation, capped at `max_threshold` so that a slide that is
all tissue (a unimodal histogram) is not split in two, and floored at `min_threshold` so flat noise on empty
glass is not tissue. The mask is then closed, opened, and small objects and holes are removed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from ldiffusion.data.stain_norm import saturation
from ldiffusion.infer.slide import SlideReader
from ldiffusion.infer.tiling import Tile


@dataclasses.dataclass(frozen=True)
class TissueMask:
    """A boolean tissue mask of a thumbnail.

    Attributes:
        mask: (h, w) bool, True = tissue.
        downsample: level-0 pixels per mask pixel.
        threshold: saturation threshold used.
    """

    mask: np.ndarray
    downsample: float
    threshold: float

    def fraction(self, x: float, y: float, w: float, h: float) -> float:
        """Return the tissue fraction of a level-0 rectangle (0 when it lies outside the mask)."""
        d = self.downsample
        mh, mw = self.mask.shape
        x0, y0 = max(int(np.floor(x / d)), 0), max(int(np.floor(y / d)), 0)
        x1, y1 = min(int(np.ceil((x + w) / d)), mw), min(int(np.ceil((y + h) / d)), mh)
        if x1 <= x0 or y1 <= y0:
            return 0.0
        return float(self.mask[y0:y1, x0:x1].mean())


def tissue_mask_from_rgb(
    rgb: np.ndarray,
    *,
    min_threshold: float = 0.05,
    max_threshold: float = 0.15,
    radius: int = 2,
    min_object_px: int = 16,
) -> tuple[np.ndarray, float]:
    """Return `(mask (h, w) bool, threshold)` of a low-resolution RGB image.

    Args:
        rgb: (h, w, 3) uint8 thumbnail.
        min_threshold, max_threshold: bounds of the saturation threshold (Otsu's is clipped to them).
        radius: radius in pixels of the closing/opening structuring element (0 = no morphology).
        min_object_px: tissue pieces and holes smaller than this many pixels are removed / filled.
    """
    from skimage.filters import threshold_otsu
    from skimage.morphology import disk, remove_small_holes, remove_small_objects

    sat = ndimage.gaussian_filter(saturation(rgb), sigma=1.0) if min(rgb.shape[:2]) > 4 else saturation(rgb)
    otsu = float(threshold_otsu(sat)) if float(sat.max()) > float(sat.min()) else min_threshold
    t = float(np.clip(otsu, min_threshold, max_threshold))
    mask = sat > t
    if radius > 0:
        se = disk(radius).astype(bool)
        padded = np.pad(mask, 2 * radius, mode="edge")  # no erosion at the image border
        padded = ndimage.binary_closing(padded, structure=se)
        padded = ndimage.binary_opening(padded, structure=se)
        mask = padded[2 * radius : -2 * radius, 2 * radius : -2 * radius]
    if min_object_px > 1 and mask.any():
        mask = (
            remove_small_objects(mask, max_size=min_object_px - 1)
            if _has_max_size()
            else remove_small_objects(mask, min_size=min_object_px)
        )
        mask = (
            remove_small_holes(mask, max_size=min_object_px - 1)
            if _has_max_size()
            else remove_small_holes(mask, area_threshold=min_object_px)
        )
    return mask, t


def _has_max_size() -> bool:
    """scikit-image >= 0.26 renamed `min_size`/`area_threshold` to `max_size` (inclusive)."""
    import inspect

    from skimage.morphology import remove_small_objects

    return "max_size" in inspect.signature(remove_small_objects).parameters


def detect_tissue(slide: SlideReader, *, thumbnail_px: int = 2048, **kwargs: float) -> TissueMask:
    """Detect tissue on a thumbnail of `slide` (longer side <= `thumbnail_px`).

    Keyword arguments go to `tissue_mask_from_rgb`.
    """
    thumb, downsample = slide.thumbnail(thumbnail_px)
    mask, t = tissue_mask_from_rgb(thumb, **kwargs)  # type: ignore[arg-type]
    return TissueMask(mask=mask, downsample=downsample, threshold=t)


def select_tiles(
    tiles: list[Tile],
    tissue: TissueMask | None,
    *,
    scale: float = 1.0,
    origin: tuple[int, int] = (0, 0),
    min_fraction: float = 0.0,
) -> list[Tile]:
    """Keep the tiles whose tissue fraction is > `min_fraction` (all tiles when `tissue` is None).

    Args:
        tiles: grid tiles in working pixels.
        tissue: the tissue mask (level-0 based) or None.
        scale: level-0 pixels per working pixel.
        origin: level-0 (x, y) of the working grid's (0, 0).
        min_fraction: minimum tissue fraction of the tile's read region.
    """
    if tissue is None:
        return list(tiles)
    ox, oy = origin
    return [
        t
        for t in tiles
        if tissue.fraction(ox + t.x * scale, oy + t.y * scale, t.w * scale, t.h * scale) > min_fraction
    ]
