"""Stain normalisation at prediction time (Reinhard et al. 2001): match colour statistics in CIE L*a*b*.

A slide stained or scanned elsewhere than the training slides differs mostly in colour. Reinhard's method
moves each L*a*b* channel of an image to the mean and standard deviation of a reference:

    lab_out = (lab - mean_source) / std_source * std_target + mean_target        (per channel)

The statistics are taken over the stained pixels only (HSV saturation above `MIN_SATURATION`), so that the
share of bright glass in an image does not move its colours. The source statistics are those of the whole
image (`ldiffusion predict`) or of a thumbnail of the whole slide (`ldiffusion slide predict`), never of one
tile, so that every tile of a slide gets the same transform. The colour conversions are scikit-image's
(`rgb2lab`, `lab2rgb`, D65).

Example:
    >>> import numpy as np
    >>> rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    >>> s = lab_stats([rgb])
    >>> bool(np.abs(reinhard(rgb, s, s).astype(int) - rgb).max() <= 1)
    True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ldiffusion.core.errors import InputError

#: pixels with HSV saturation (max - min) / max at or below this are glass: left out of the statistics
MIN_SATURATION = 0.05
#: below this share of stained pixels every pixel counts (an image that is nearly all grey)
MIN_STAINED_SHARE = 0.01
#: floor of a standard deviation, in L*a*b* units, so that a flat channel does not blow up
MIN_STD = 1e-3


@dataclasses.dataclass(frozen=True)
class LabStats:
    """Per-channel mean and standard deviation of stained pixels in CIE L*a*b*.

    Attributes:
        mean: (L*, a*, b*) means.
        std: (L*, a*, b*) standard deviations (>= `MIN_STD`).
        pixels: number of pixels the statistics were taken over.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pixels: int

    def to_json(self) -> dict[str, Any]:
        """Return {"mean": [...], "std": [...], "pixels": n}, rounded to 4 decimals (for params files)."""
        return {"mean": [round(v, 4) for v in self.mean], "std": [round(v, 4) for v in self.std],
                "pixels": int(self.pixels)}


def _check_rgb(image: np.ndarray, where: str) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise InputError(f"{where}: expected an (H, W, 3) uint8 RGB image, "
                         f"got {image.dtype} {tuple(image.shape)}")


def saturation(rgb: np.ndarray) -> np.ndarray:
    """Return the HSV saturation (max - min) / max of an (h, w, 3) uint8 image as float32 in [0, 1]."""
    mx, mn = rgb.max(-1), rgb.min(-1)  # uint8: no full-size float copy of the image
    out = (mx - mn).astype(np.float32)
    out /= np.maximum(mx, 1).astype(np.float32)
    return out


def stained_pixels(image: np.ndarray) -> np.ndarray:
    """Return the (N, 3) uint8 pixels of `image` (H, W, 3) whose saturation exceeds `MIN_SATURATION`.

    All pixels when fewer than `MIN_STAINED_SHARE` of them qualify.
    """
    flat = image.reshape(-1, 3)
    keep = saturation(image).reshape(-1) > MIN_SATURATION
    if keep.sum() < MIN_STAINED_SHARE * flat.shape[0]:
        return flat
    return flat[keep]


def lab_stats(images: Iterable[np.ndarray], where: str = "image") -> LabStats:
    """Pool the L*a*b* mean and standard deviation of the stained pixels of `images`.

    Args:
        images: (H, W, 3) uint8 RGB arrays (sizes may differ).
        where: name of the source, for error messages.

    Returns:
        `LabStats`, means and SDs rounded to 4 decimals (as `LabStats.to_json` stores them).

    Raises:
        InputError: an image that is not (H, W, 3) uint8, or no image at all.
    """
    from skimage.color import rgb2lab

    n = 0
    s1 = np.zeros(3, dtype=np.float64)
    s2 = np.zeros(3, dtype=np.float64)
    for image in images:
        _check_rgb(image, where)
        px = stained_pixels(image)
        lab = rgb2lab(px[None].astype(np.float32) / 255.0)[0].astype(np.float64)  # (N, 3)
        n += lab.shape[0]
        s1 += lab.sum(0)
        s2 += (lab**2).sum(0)
    if n == 0:
        raise InputError(f"{where}: no image to take stain statistics from")
    mean = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mean**2, 0.0))
    # rounded as `to_json` stores them, so that a run's stored reference equals the one taken from its data
    m = (round(float(mean[0]), 4), round(float(mean[1]), 4), round(float(mean[2]), 4))
    sd = tuple(round(max(float(v), MIN_STD), 4) for v in std)
    return LabStats(m, (sd[0], sd[1], sd[2]), n)


def reinhard(image: np.ndarray, source: LabStats, target: LabStats) -> np.ndarray:
    """Map `image` (H, W, 3) uint8 from the `source` colour statistics to the `target` ones (uint8 out).

    Every pixel gets the same per-channel affine map in L*a*b*; the result is clipped to the RGB gamut.
    """
    from skimage.color import lab2rgb, rgb2lab

    _check_rgb(image, "reinhard")
    lab = rgb2lab(image.astype(np.float32) / 255.0)
    src_mean, src_std = np.asarray(source.mean, np.float32), np.asarray(source.std, np.float32)
    tgt_mean, tgt_std = np.asarray(target.mean, np.float32), np.asarray(target.std, np.float32)
    lab = (lab - src_mean) * (tgt_std / src_std) + tgt_mean
    lab[..., 0] = np.clip(lab[..., 0], 0.0, 100.0)
    rgb = lab2rgb(lab)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def train_split_stats(root: str | Path, max_images: int = 64) -> LabStats:
    """Pool the statistics of the `train` split of the prepared data set `root`.

    At most `max_images` images, spread evenly over the split (every ⌈n / max_images⌉-th id).

    Raises:
        InputError: no train split, or a missing image.
    """
    from ldiffusion.data.dataset import sample_path
    from ldiffusion.data.format import read_dataset_info, read_image

    root = Path(root)
    ids = read_dataset_info(root).ids("train")
    if not ids:
        raise InputError(f"{root}: the data set has no train split to take colours from")
    picked = ids[:: max(1, math.ceil(len(ids) / max_images))]
    paths = [sample_path(root, "images", i) for i in picked]
    missing = [i for i, q in zip(picked, paths, strict=True) if q is None]
    if missing:
        raise InputError(f"{root}: image of train id {missing[0]!r} not found")
    return lab_stats((read_image(q) for q in paths if q is not None), where=str(root))


def reference_stats(ref: str | Path) -> LabStats:
    """Return the target statistics of `--stain-normalize REF`.

    REF is one of:
    - a run folder (`config.json`): the statistics of its training split, which `ldiffusion train` stores
      there as `stain_reference`;
    - a prepared data set folder (`dataset.json`): its train split (`train_split_stats`);
    - an image file: its stained pixels.

    Raises:
        InputError: REF missing, not one of the above, or a run folder without stored statistics.
    """
    from ldiffusion.core.io import read_json
    from ldiffusion.data.format import IMAGE_SUFFIXES, read_image

    p = Path(ref)
    if p.is_dir():
        if (p / "config.json").is_file():
            stored = read_json(p / "config.json").get("stain_reference")
            try:
                return LabStats(tuple(stored["mean"]), tuple(stored["std"]), int(stored["pixels"]))
            except (TypeError, KeyError, ValueError) as e:
                raise InputError(f"--stain-normalize {p / 'config.json'}: no 'stain_reference' of the "
                                 "training colours (a run trained before it was stored); give the training "
                                 "data set folder or an image instead") from e
        if (p / "dataset.json").is_file():
            return train_split_stats(p)
        raise InputError(f"--stain-normalize {p}: a folder must be a run (config.json) or a prepared data "
                         "set (dataset.json); or give one reference image file")
    if not p.is_file():
        raise InputError(f"--stain-normalize {p}: no such file or folder")
    if p.suffix.lower() not in IMAGE_SUFFIXES:
        raise InputError(f"--stain-normalize {p}: not an image file; expected one of {list(IMAGE_SUFFIXES)}")
    return lab_stats([read_image(p)], where=str(p))


__all__ = ["MIN_SATURATION", "LabStats", "lab_stats", "reference_stats", "reinhard", "saturation",
           "stained_pixels", "train_split_stats"]
