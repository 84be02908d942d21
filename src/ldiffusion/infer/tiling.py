"""Tile grids and blending weights (pure functions, no I/O).

A grid cuts a `width` x `height` image into square tiles of `tile_px` that overlap by at least
`overlap_px`. The last tile of each row/column is flush with the image end, so every tile lies
inside the image (except when the image is smaller than one tile: then a single tile starts at 0
and the reader pads it). Each tile also carries a *write* region (StarDist `big.py` style): the
tile minus half the overlap towards each neighbour; the write regions partition the image, so each
pixel is owned by exactly one tile.

Example:
    >>> tiles = tile_grid(1000, 600, tile_px=512, overlap_px=64)
    >>> [(t.x, t.y) for t in tiles]
    [(0, 0), (448, 0), (488, 0), (0, 88), (448, 88), (488, 88)]
    >>> sum(t.write_w * t.write_h for t in tiles) == 1000 * 600
    True
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from ldiffusion.core.errors import InputError


@dataclasses.dataclass(frozen=True)
class Tile:
    """One tile of a grid, in pixels of the grid's image.

    Attributes:
        index: position in the grid's row-major order.
        x, y: top-left corner of the read region.
        w, h: size of the read region (always `tile_px`; may exceed a small image).
        write_x, write_y, write_w, write_h: the region this tile owns (write regions partition the image).
    """

    index: int
    x: int
    y: int
    w: int
    h: int
    write_x: int
    write_y: int
    write_w: int
    write_h: int


def tile_starts(size: int, tile_px: int, stride: int) -> list[int]:
    """Return tile start offsets covering [0, size); the last tile is flush with the end.

    Example:
        >>> tile_starts(1000, 512, 448)
        [0, 448, 488]
    """
    if size <= tile_px:
        return [0]
    starts = list(range(0, size - tile_px + 1, stride))
    if starts[-1] != size - tile_px:
        starts.append(size - tile_px)
    return starts


def _write_bounds(starts: list[int], tile_px: int, size: int) -> list[tuple[int, int]]:
    """Split [0, size) at the middle of each overlap between consecutive tiles."""
    cuts = [0]
    for a, b in itertools.pairwise(starts):
        end_a = min(a + tile_px, size)
        cuts.append((b + end_a) // 2)
    cuts.append(size)
    return [(cuts[i], cuts[i + 1]) for i in range(len(starts))]


def tile_grid(width: int, height: int, tile_px: int, overlap_px: int) -> list[Tile]:
    """Return the tiles covering a `width` x `height` image, in row-major order.

    Args:
        width, height: image size in pixels (>= 1).
        tile_px: tile side in pixels (>= 1).
        overlap_px: minimum overlap between neighbouring tiles, in [0, tile_px).

    Returns:
        Tiles in row-major order (y, then x); consecutive tiles share at least `overlap_px` pixels.

    Raises:
        InputError: a size is not positive or the overlap is out of range.
    """
    if width < 1 or height < 1:
        raise InputError(f"image size must be positive, got width={width}, height={height}")
    if tile_px < 1:
        raise InputError(f"tile_px={tile_px} should be >= 1")
    if not 0 <= overlap_px < tile_px:
        raise InputError(f"overlap_px={overlap_px} is out of range; expected [0, tile_px={tile_px})")
    stride = tile_px - overlap_px
    xs, ys = tile_starts(width, tile_px, stride), tile_starts(height, tile_px, stride)
    wxs, wys = _write_bounds(xs, tile_px, width), _write_bounds(ys, tile_px, height)
    tiles = []
    for y, (wy0, wy1) in zip(ys, wys, strict=True):
        for x, (wx0, wx1) in zip(xs, wxs, strict=True):
            tiles.append(Tile(len(tiles), x, y, tile_px, tile_px, wx0, wy0, wx1 - wx0, wy1 - wy0))
    return tiles


def gaussian_weight(tile_px: int, sigma_scale: float = 0.125, floor: float = 1e-3) -> np.ndarray:
    """Return a (tile_px, tile_px) float32 Gaussian blending weight, maximum 1, minimum >= `floor`.

    sigma = `sigma_scale` * tile_px (nnU-Net / MONAI "gaussian" mode); the floor keeps tile borders
    weighted, so every pixel covered by a tile gets a positive weight.
    """
    if tile_px < 1:
        raise InputError(f"tile_px={tile_px} should be >= 1")
    c = (tile_px - 1) / 2
    sigma = max(tile_px * sigma_scale, 1e-6)
    g = np.exp(-((np.arange(tile_px, dtype=np.float64) - c) ** 2) / (2 * sigma**2))
    w = np.outer(g, g)
    w /= w.max()
    return np.maximum(w, floor).astype(np.float32)
