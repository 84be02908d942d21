"""A procedural H&E-like data set for tests, demos and `ldiffusion data synth`.

Every image is drawn from the same geometry that defines its masks, so labels are exact:

=====  ==========  ====================================================================
id     name        appearance
=====  ==========  ====================================================================
0      background  near white; also the *lumen* of glands (empty space, labelled 0)
1      stroma      pink, fibrous texture (anisotropically smoothed noise)
2      nucleus     dark purple / blue ellipses of varied size and density; each one has
                   its own id in `instances/` (nuclei never overlap, ids are 1..N)
3      gland       epithelial ring, lighter lavender-pink, around a white lumen (class 0)
4      necrosis    rare: brownish speckled blob, present in ~20% of the images, small area
=====  ==========  ====================================================================

The colour cues are strong on purpose: a small CNN separates the classes at 64 px within a few
hundred steps. The set is deterministic per seed (byte-identical files), and so are its splits.

Example:
    >>> info = make_synthetic_dataset(tmp_path / "synth", n=8, size=64)   # doctest: +SKIP
    >>> info.num_classes                                                    # doctest: +SKIP
    5
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from ldiffusion.core.errors import InputError
from ldiffusion.data.format import ClassInfo, DatasetInfo
from ldiffusion.data.staging import commit, open_output, staged

logger = logging.getLogger(__name__)

BACKGROUND, STROMA, NUCLEUS, GLAND, NECROSIS = 0, 1, 2, 3, 4
RARE_FRACTION = 0.2

CLASSES = (
    ClassInfo(BACKGROUND, "background", (0, 0, 0)),
    ClassInfo(STROMA, "stroma", (255, 105, 180)),
    ClassInfo(NUCLEUS, "nucleus", (0, 0, 255)),
    ClassInfo(GLAND, "gland", (0, 200, 0)),
    ClassInfo(NECROSIS, "necrosis", (255, 200, 0)),
)

# Mean RGB of each class in the rendered image (before texture and per-image stain variation).
_BASE_RGB = np.array(
    [
        [243, 240, 245],  # background / lumen
        [236, 150, 186],  # stroma: pink (eosin)
        [72, 44, 128],  # nucleus: dark purple (haematoxylin)
        [186, 136, 214],  # gland epithelium: lavender pink
        [150, 104, 72],  # necrosis: brownish debris
    ],
    dtype=np.float32,
)
_TEXTURE_AMP = np.array([3.0, 16.0, 12.0, 9.0, 24.0], dtype=np.float32)


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int], sigma: float | tuple[float, float]
) -> np.ndarray:
    """Return Gaussian-smoothed white noise rescaled to zero mean, unit std, (H, W) float32."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-6)


def _ellipse(
    shape: tuple[int, int],
    cy: float,
    cx: float,
    ry: float,
    rx: float,
    angle: float,
    box_radius: float | None = None,
) -> tuple[tuple[slice, slice], np.ndarray]:
    """Return (bounding-box slices, boolean mask inside the box) of a rotated ellipse.

    The box has half-side `box_radius` (default: the larger semi-axis) plus one pixel.
    """
    h, w = shape
    r = (max(ry, rx) if box_radius is None else box_radius) + 1
    y0, y1 = max(int(cy - r), 0), min(int(cy + r) + 2, h)
    x0, x1 = max(int(cx - r), 0), min(int(cx + r) + 2, w)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    inside = (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
    return (slice(y0, y1), slice(x0, x1)), inside


def make_sample(
    rng: np.random.Generator, size: int, with_rare: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one synthetic tile.

    Args:
        rng: source of every random draw.
        size: side length in pixels (>= 16).
        with_rare: whether to draw a necrosis blob (class 4).

    Returns:
        image (size, size, 3) uint8 RGB, label (size, size) uint8 class ids 0..4,
        inst (size, size) uint16 nucleus instance ids 0..N (0 = no nucleus).
    """
    shape = (size, size)
    scale = size / 128.0
    # Tissue vs background from a coarse noise field, tissue fraction 60-90 %.
    coarse = _smooth_noise(rng, shape, sigma=max(size / 8.0, 2.0))
    tissue = coarse > np.quantile(coarse, 1.0 - rng.uniform(0.6, 0.9))
    label = np.where(tissue, STROMA, BACKGROUND).astype(np.uint8)

    # Glands: epithelial ring around a lumen labelled background.
    for _ in range(int(rng.integers(0, 3))):
        r_out = size * rng.uniform(0.12, 0.22)
        aspect = rng.uniform(0.7, 1.0)
        cy, cx = rng.uniform(r_out, size - r_out, 2)
        angle = rng.uniform(0, np.pi)
        box, outer = _ellipse(shape, cy, cx, r_out * aspect, r_out, angle)
        thick = rng.uniform(0.35, 0.5)
        _, inner = _ellipse(
            shape, cy, cx, r_out * aspect * (1 - thick), r_out * (1 - thick), angle, box_radius=r_out
        )
        region = label[box]
        region[outer] = GLAND
        region[inner] = BACKGROUND

    # Necrosis: a small irregular blob (rare); it covers whatever lies below it.
    if with_rare:
        r = size * rng.uniform(0.07, 0.12)
        cy, cx = rng.uniform(r, size - r, 2)
        box, disc = _ellipse(shape, cy, cx, r * rng.uniform(0.7, 1.0), r, rng.uniform(0, np.pi))
        wobble = _smooth_noise(rng, shape, sigma=max(r / 3.0, 1.0))[box]
        blob = disc & (wobble > -0.8)
        if not blob.any():
            blob = disc
        label[box][blob] = NECROSIS

    # Nuclei: non-overlapping ellipses centred in stroma or gland epithelium, clipped to them.
    inst = np.zeros(shape, dtype=np.uint16)
    host = np.isin(label, (STROMA, GLAND))
    density = rng.uniform(0.3, 1.6)
    n_try = round(30 * density * scale * scale) + 2
    next_id = 1
    for _ in range(n_try):
        cy, cx = rng.uniform(0, size, 2)
        rx, ry = rng.uniform(2.5, 5.5), rng.uniform(2.0, 4.0)
        angle = rng.uniform(0, np.pi)
        iy, ix = min(int(cy), size - 1), min(int(cx), size - 1)
        if not host[iy, ix]:
            continue
        box, el = _ellipse(shape, cy, cx, ry, rx, angle)
        el = el & host[box]
        if el.sum() < 4 or (inst[box][el] > 0).any():
            continue
        inst[box][el] = next_id
        next_id += 1
    label[inst > 0] = NUCLEUS

    # Render: per-class base colour with per-image stain variation, texture, light blur.
    stain = 1.0 + rng.normal(0.0, 0.03, size=(5, 3)).astype(np.float32)
    base = (_BASE_RGB * stain)[label]
    fibres = _smooth_noise(rng, shape, sigma=(0.8, 3.0))
    fine = _smooth_noise(rng, shape, sigma=0.7)
    texture = np.where(label == STROMA, fibres, fine)
    speck = rng.standard_normal(shape).astype(np.float32)
    texture = np.where(label == NECROSIS, 0.5 * fine + 0.8 * speck, texture)
    img = base + (_TEXTURE_AMP[label] * texture)[..., None] * np.array([1.0, 0.9, 0.8], dtype=np.float32)
    img += rng.normal(0.0, 2.0, size=(*shape, 3)).astype(np.float32)
    img = ndimage.gaussian_filter(img, sigma=(0.5, 0.5, 0))
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return image, label, inst


def split_ids(
    ids: Sequence[str], fractions: Sequence[float], rng: np.random.Generator
) -> dict[str, list[str]]:
    """Shuffle `ids` with `rng` and cut them into train/val/test by `fractions` (each sorted).

    Every split with a positive fraction gets at least one id when there are enough ids.
    """
    order = [ids[i] for i in rng.permutation(len(ids))]
    n = len(order)
    total = float(sum(fractions))
    counts = [round(n * f / total) for f in fractions]
    for i, f in enumerate(fractions):  # non-empty splits where possible
        if f > 0 and counts[i] == 0 and n >= sum(1 for x in fractions if x > 0):
            counts[i] = 1
    while sum(counts) > n:
        counts[int(np.argmax(counts))] -= 1
    counts[0] += n - sum(counts)
    out, start = {}, 0
    for name, c in zip(("train", "val", "test"), counts, strict=True):
        out[name] = sorted(order[start : start + c])
        start += c
    return out


@staged("synth")
def make_synthetic_dataset(
    out: str | os.PathLike[str],
    n: int = 40,
    size: int = 128,
    seed: int = 0,
    splits: Sequence[float] = (0.6, 0.2, 0.2),
) -> DatasetInfo:
    """Write a synthetic H&E-like instance data set to `out` in the standard format.

    Args:
        out: destination folder: new, empty, or holding a synthetic set (replaced once the new
            one is complete). A data set written by another command is replaced only with the
            extra keyword `force=True`; any other non-empty folder is refused.
        n: number of images (>= 1).
        size: image side in pixels (>= 16).
        seed: seed of every random draw; the same seed gives byte-identical files.
        splits: train/val/test fractions (non-negative, positive sum).

    Returns:
        The `DatasetInfo` written to `out/dataset.json` (task "instance", 5 classes).

    Raises:
        InputError: `n`, `size` or `splits` out of range, or `out` refused (see above).
    """
    if n < 1:
        raise InputError(f"n={n} is out of range; expected at least 1 image")
    if size < 16:
        raise InputError(f"size={size} is out of range; expected at least 16 px")
    if len(splits) != 3 or any(f < 0 for f in splits) or sum(splits) <= 0:
        raise InputError(
            f"splits={tuple(splits)} is not valid; expected 3 non-negative train/val/test fractions"
        )
    children = np.random.SeedSequence(seed).spawn(n + 1)
    plan_rng = np.random.default_rng(children[0])
    n_rare = max(1, round(RARE_FRACTION * n)) if n >= 2 else 0
    rare = set(plan_rng.choice(n, size=n_rare, replace=False).tolist()) if n_rare else set()
    ids = [f"synth_{i:04d}" for i in range(n)]
    writer = open_output(out)
    for i, case_id in enumerate(ids):
        image, label, inst = make_sample(np.random.default_rng(children[i + 1]), size, i in rare)
        writer.add(case_id, image, label, inst)
    info = DatasetInfo(
        name="synth",
        task="instance",
        classes=CLASSES,
        splits=split_ids(ids, splits, plan_rng),
        ignore_index=255,
        mpp=None,
        source=f"ldiffusion.data.synth.make_synthetic_dataset(n={n}, size={size}, seed={seed})",
        license="CC0-1.0",
    )
    writer.finish(info, manifest={"converter": "synth", "generator": "ldiffusion.data.synth", "seed": seed,
                                  "size": size})
    commit(writer)
    logger.info("wrote synthetic data set (%d images of %d px, seed %d) to %s", n, size, seed, Path(out))
    return info
