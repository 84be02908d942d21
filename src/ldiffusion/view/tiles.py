"""Deep-zoom tile geometry, tile rendering from pyramids, colour maps and a byte-bounded LRU cache.

Tile addressing follows Deep Zoom (DZI), as OpenSeadragon requests it: for a level-0 image of
`width x height` pixels, `max_level = ceil(log2(max(width, height)))`; level `L` has downsample
`ds = 2 ** (max_level - L)` and size `ceil(width / ds) x ceil(height / ds)`; tile `(col, row)` of
level `L` covers level pixels `[col * tile_px, (col + 1) * tile_px)` (no overlap; edge tiles are
cropped to the level), i.e. level-0 pixels `[col * tile_px * ds, ...)`.

Every layer (slide, class map, uncertainty, object outlines) is addressed in the slide's level-0
frame, so OpenSeadragon stacks them pixel for pixel. A tile is rendered on demand from the
nearest pyramid level that is at least as fine as the tile (`read_scaled` for the slide, nearest
sampling for label maps) and kept in an LRU cache bounded in bytes.

Example:
    >>> g = TileGrid(5280, 3000, 256)
    >>> g.max_level, g.level_size(g.max_level), g.level_size(g.max_level - 1)
    (13, (5280, 3000), (2640, 1500))
    >>> g.tile_region(g.max_level - 1, 1, 0)
    (512, 0, 256, 256, 2)
"""

from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ldiffusion.core.errors import InputError

#: viridis, 9 anchors (matplotlib's values at 0, 1/8, ..., 1), interpolated linearly to 256 entries
VIRIDIS_ANCHORS = (
    (68, 1, 84),
    (71, 44, 122),
    (59, 81, 139),
    (44, 113, 142),
    (33, 144, 141),
    (39, 173, 129),
    (92, 200, 99),
    (170, 220, 50),
    (253, 231, 37),
)


def colormap_lut(anchors: tuple[tuple[int, int, int], ...] = VIRIDIS_ANCHORS) -> np.ndarray:
    """Return a (256, 3) uint8 colour table interpolated linearly between evenly spaced anchors."""
    a = np.asarray(anchors, dtype=np.float64)
    pos = np.linspace(0.0, 255.0, len(a))
    idx = np.arange(256, dtype=np.float64)
    return np.stack([np.rint(np.interp(idx, pos, a[:, c])) for c in range(3)], axis=1).astype(np.uint8)


UNCERTAINTY_LUT = colormap_lut()


def uncertainty_alpha(u8: np.ndarray) -> np.ndarray:
    """Opacity of the uncertainty layer: transparent at 0, opaque from 1/3 (u8 >= 85) on; uint8."""
    return np.minimum(u8.astype(np.uint16) * 3, 255).astype(np.uint8)


def encode_png(arr: np.ndarray, compress_level: int = 1) -> bytes:
    """Encode a uint8 (h, w), (h, w, 3) or (h, w, 4) array as PNG bytes (fast, lossless)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


@dataclass(frozen=True)
class TileGrid:
    """Deep-zoom tile pyramid of a `width x height` level-0 image.

    Attributes:
        width, height: level-0 size in pixels.
        tile_px: tile side.
    """

    width: int
    height: int
    tile_px: int = 256

    @property
    def max_level(self) -> int:
        """Finest deep-zoom level (downsample 1)."""
        return max(0, math.ceil(math.log2(max(self.width, self.height, 1))))

    def downsample(self, level: int) -> int:
        """Level-0 pixels per pixel of `level`."""
        return 2 ** (self.max_level - level)

    def level_size(self, level: int) -> tuple[int, int]:
        """(width, height) of `level` in its own pixels."""
        ds = self.downsample(level)
        return max(1, math.ceil(self.width / ds)), max(1, math.ceil(self.height / ds))

    def tile_region(self, level: int, col: int, row: int) -> tuple[int, int, int, int, int]:
        """Return `(x0, y0, w, h, ds)`: level-0 top-left, tile size in level pixels, downsample.

        Raises:
            InputError: the level or tile address lies outside the pyramid.
        """
        if not 0 <= level <= self.max_level:
            raise InputError(f"tile level {level} is out of range 0..{self.max_level}")
        lw, lh = self.level_size(level)
        x, y = col * self.tile_px, row * self.tile_px
        if col < 0 or row < 0 or x >= lw or y >= lh:
            raise InputError(f"tile ({col}, {row}) is outside level {level} ({lw} x {lh} px)")
        ds = self.downsample(level)
        return x * ds, y * ds, min(self.tile_px, lw - x), min(self.tile_px, lh - y), ds

    def min_level_for(self, coarsest_downsample: float, max_factor: int = 4) -> int:
        """Coarsest level worth requesting when the source's coarsest pyramid level has `coarsest_downsample`.

        Tiles coarser than `max_factor` x the source's coarsest level would read more than
        `(max_factor * tile_px) ** 2` source pixels each, so the viewer never asks for them.
        """
        limit = max(1.0, float(coarsest_downsample)) * max_factor
        level = self.max_level
        while level > 0 and self.downsample(level - 1) <= limit:
            level -= 1
        return level


class LabelPyramid:
    """A pyramidal single-channel OME-TIFF (label map or uncertainty) read region by region.

    Levels are the TIFF's series levels (SubIFDs) opened as zarr arrays through tifffile, so a
    request reads only the TIFF tiles it touches.

    Args:
        path: `.ome.tif` written by `ldiffusion.infer.writers.write_ome_tiff`.
    """

    def __init__(self, path: Any) -> None:
        try:
            import tifffile
            import zarr
        except ImportError as e:
            raise InputError(
                "ldiffusion view needs tifffile and zarr from the 'slides' extra: "
                'pip install "ldiffusion[slides,view]"'
            ) from e
        self.path = str(path)
        try:
            self._tif = tifffile.TiffFile(self.path)
            series = self._tif.series[0]
            self.levels = [zarr.open(series.aszarr(level=i), mode="r") for i in range(len(series.levels))]
        except Exception as e:  # tifffile raises several types for unreadable files
            raise InputError(f"{path}: cannot read the pyramidal TIFF ({e})") from e
        if self.levels[0].ndim != 2:
            raise InputError(
                f"{path}: expected a single-channel (Y, X) image, got shape {self.levels[0].shape}"
            )
        self.shape = tuple(int(v) for v in self.levels[0].shape)
        # integer ratio of each level to level 0 (levels are every r-th pixel of the previous one)
        self.ratios = [1]
        for prev, cur in zip(self.levels[:-1], self.levels[1:], strict=True):
            self.ratios.append(self.ratios[-1] * max(1, round(prev.shape[1] / cur.shape[1])))
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the TIFF file."""
        self._tif.close()

    def sample(
        self, x0: float, y0: float, w: int, h: int, ds: float, *, origin: tuple[float, float], scale: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Sample the map by nearest neighbour on a level-0 grid.

        Output pixel `(i, j)` has its centre at level-0 `(x0 + (j + 0.5) * ds, y0 + (i + 0.5) * ds)`;
        map pixel `k` of level 0 covers level-0 `[origin + k * scale, origin + (k + 1) * scale)`.
        The coarsest map level whose pixel is no larger than `ds` is read.

        Args:
            x0, y0: level-0 top-left of the output grid.
            w, h: output size.
            ds: level-0 pixels per output pixel.
            origin: level-0 (x, y) of the map's pixel (0, 0).
            scale: level-0 pixels per map pixel.

        Returns:
            `(values (h, w) uint8, inside (h, w) bool)`; values are 0 outside the map.
        """
        k = 0
        for i, r in enumerate(self.ratios):
            if r * scale <= ds * (1 + 1e-6):
                k = i
        arr, r = self.levels[k], self.ratios[k]
        lh, lw = arr.shape
        f = scale * r  # level-0 px per map-level px
        cols = np.floor((x0 + (np.arange(w) + 0.5) * ds - origin[0]) / f).astype(np.int64)
        rows = np.floor((y0 + (np.arange(h) + 0.5) * ds - origin[1]) / f).astype(np.int64)
        cin, rin = (cols >= 0) & (cols < lw), (rows >= 0) & (rows < lh)
        out = np.zeros((h, w), np.uint8)
        inside = rin[:, None] & cin[None, :]
        if cin.any() and rin.any():
            c0, c1 = int(cols[cin].min()), int(cols[cin].max()) + 1
            r0, r1 = int(rows[rin].min()), int(rows[rin].max()) + 1
            with self._lock:
                block = np.asarray(arr[r0:r1, c0:c1])
            sub = block[
                np.clip(rows - r0, 0, r1 - r0 - 1)[:, None], np.clip(cols - c0, 0, c1 - c0 - 1)[None, :]
            ]
            out[inside] = sub[inside]
        return out, inside

    def read_box(self, x0: int, y0: int, x1: int, y1: int, max_px: int = 1024) -> tuple[np.ndarray, int]:
        """Read map pixels `[y0:y1, x0:x1]` (level-0 map coordinates) from the finest level whose box side is
        <= `max_px`; returns `(block, ratio)` where block pixel `(i, j)` is map pixel `(y0 + i*ratio, ...)`.
        """
        k = 0
        for i, r in enumerate(self.ratios):
            k = i
            if max(x1 - x0, y1 - y0) / r <= max_px:
                break
        r = self.ratios[k]
        arr = self.levels[k]
        with self._lock:
            block = np.asarray(
                arr[max(0, y0 // r) : max(0, -(-y1 // r)), max(0, x0 // r) : max(0, -(-x1 // r))]
            )
        return block, r


def colour_labels(values: np.ndarray, inside: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """RGBA tile of a class map: class colour, transparent on background (0) and outside the map."""
    pal = np.asarray(palette, dtype=np.uint8)
    rgba = np.zeros((*values.shape, 4), np.uint8)
    rgba[..., :3] = pal[np.clip(values, 0, len(pal) - 1)]
    rgba[..., 3] = np.where(inside & (values > 0), 255, 0).astype(np.uint8)
    return rgba


def colour_uncertainty(values: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """RGBA tile of an uncertainty map (uint8, 255 = 1): viridis colour, opacity `uncertainty_alpha`."""
    rgba = np.zeros((*values.shape, 4), np.uint8)
    rgba[..., :3] = UNCERTAINTY_LUT[values]
    rgba[..., 3] = np.where(inside, uncertainty_alpha(values), 0).astype(np.uint8)
    return rgba


class TileCache:
    """A thread-safe LRU cache of encoded tiles, bounded by their total size in bytes.

    Args:
        max_bytes: evict the least recently used tiles beyond this total.
    """

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Hashable, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, make: Callable[[], bytes]) -> bytes:
        """Return the cached bytes of `key`, computing them with `make()` on a miss."""
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return data
            self.misses += 1
        data = make()
        with self._lock:
            if key not in self._items:
                self._items[key] = data
                self._bytes += len(data)
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old)
        return data

    def __len__(self) -> int:
        return len(self._items)


__all__ = [
    "UNCERTAINTY_LUT",
    "LabelPyramid",
    "TileCache",
    "TileGrid",
    "colormap_lut",
    "colour_labels",
    "colour_uncertainty",
    "encode_png",
    "uncertainty_alpha",
]
