"""Whole-slide readers with explicit units (level-0 pixels, microns per pixel).

One facade, `SlideReader`, over three back ends:

- `TiffSlideReader`: SVS and generic (pyramidal) TIFF through `tiffslide` (extra `slides`);
- `OpenSlideReader`: every other vendor format through `openslide-python` + `openslide-bin`
  (extra `openslide`);
- `ArraySlide` / `VirtualSlide`: a numpy array, or pixels generated on demand from their
  coordinates (tests and memory benchmarks).

Units follow TIAToolbox: every location is in **level-0 pixels**; a size is in pixels of the level
read. `mpp` is microns per level-0 pixel (None when unknown; `open_slide(path, mpp=...)` overrides
or supplies it). `bounds_offset` is the (x, y) of the scanned area's bounding box in level-0
pixels (OpenSlide `bounds-x/y`; (0, 0) when absent). Regions outside the image read as white.

Example:
    >>> import numpy as np
    >>> s = ArraySlide(np.zeros((100, 200, 3), np.uint8), mpp=0.5)
    >>> s.dimensions, s.level_dimensions
    ((200, 100), ((200, 100), (100, 50), (50, 25)))
    >>> s.read_region(190, 0, 20, 1)[0, :, 0].tolist()[8:12]
    [0, 0, 255, 255]
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ldiffusion.core.errors import InputError
from ldiffusion.infer.outputs import DEFAULT_MAX_BYTES, check_bytes

logger = logging.getLogger(__name__)

#: fill value of regions outside the slide (white, as glass)
PAD_VALUE = 255


class SlideReader:
    """Base class: a pyramid of RGB levels addressed in level-0 pixels.

    Subclasses set `dimensions`, `level_dimensions`, `level_downsamples`, `mpp`, `bounds_offset`,
    `path` and implement `_read(x, y, w, h, level)` for regions that lie inside the level.
    """

    path: str = ""
    level_dimensions: tuple[tuple[int, int], ...] = ()
    level_downsamples: tuple[float, ...] = ()
    mpp: float | None = None
    bounds_offset: tuple[int, int] = (0, 0)
    bounds_size: tuple[int, int] | None = None

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 size (width, height)."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self.level_dimensions)

    def _read(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        """Read an in-bounds region: `x, y` in level-0 px, `w, h` in level px -> (h, w, 3) uint8."""
        raise NotImplementedError

    def close(self) -> None:
        """Release file handles (no-op by default)."""

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_region(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        """Read a region, padding the parts outside the level with white.

        Args:
            x, y: top-left corner in level-0 pixels (may be negative or beyond the slide).
            w, h: size in pixels of `level`.
            level: pyramid level index.

        Returns:
            (h, w, 3) uint8 RGB.
        """
        if not 0 <= level < self.level_count:
            raise InputError(
                f"{self.path}: level={level} is out of range; the slide has levels 0..{self.level_count - 1}"
            )
        if w < 1 or h < 1:
            raise InputError(f"region size must be positive, got w={w}, h={h}")
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        # region in level pixels
        lx, ly = math.floor(x / ds), math.floor(y / ds)
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + w, lw), min(ly + h, lh)
        if x0 == lx and y0 == ly and x1 == lx + w and y1 == ly + h:
            return self._read(x, y, w, h, level)
        out = np.full((h, w, 3), PAD_VALUE, dtype=np.uint8)
        if x1 > x0 and y1 > y0:
            # level-0 origin of the clipped region: exact for the clipped side, else the request's
            ox = x if x0 == lx else round(x0 * ds)
            oy = y if y0 == ly else round(y0 * ds)
            out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = self._read(ox, oy, x1 - x0, y1 - y0, level)
        return out

    def best_level_for_downsample(self, downsample: float) -> int:
        """Return the coarsest level whose downsample is <= `downsample` (level 0 at least)."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + 1e-6):
                best = i
        return best

    def read_scaled(self, x: int, y: int, w: int, h: int, downsample: float) -> np.ndarray:
        """Read (h, w, 3) uint8 pixels at `downsample` (>= 1) with top-left `x, y` in level-0 px.

        Reads the best pyramid level and resizes it (box filter); `downsample=1` is a plain level-0 read.
        """
        if abs(downsample - 1.0) < 1e-9:
            return self.read_region(x, y, w, h, 0)
        level = self.best_level_for_downsample(downsample)
        ds = self.level_downsamples[level]
        rw = max(1, math.ceil(w * downsample / ds))
        rh = max(1, math.ceil(h * downsample / ds))
        region = self.read_region(x, y, rw, rh, level)
        if (rw, rh) == (w, h):
            return region
        box = (0.0, 0.0, w * downsample / ds, h * downsample / ds)
        return np.asarray(Image.fromarray(region).resize((w, h), Image.Resampling.BOX, box=box))

    def read_scaled_strips(
        self, x: int, y: int, w: int, h: int, downsample: float, strip_rows: int = 256
    ) -> np.ndarray:
        """`read_scaled` in row strips of the output, so memory stays near the output size."""
        out = np.empty((h, w, 3), np.uint8)
        for r0 in range(0, h, strip_rows):
            r1 = min(r0 + strip_rows, h)
            out[r0:r1] = self.read_scaled(x, round(y + r0 * downsample), w, r1 - r0, downsample)
        return out

    def thumbnail(self, max_px: int = 1024) -> tuple[np.ndarray, float]:
        """Return `(thumbnail (h, w, 3) uint8, downsample)` with the longer side <= `max_px`.

        The thumbnail is built in strips from the coarsest level that is at least that large, so
        memory stays bounded by the thumbnail and one strip.
        """
        W, H = self.dimensions
        downsample = max(W / max_px, H / max_px, 1.0)
        tw, th = max(1, round(W / downsample)), max(1, round(H / downsample))
        level = self.best_level_for_downsample(downsample)
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        f = downsample / ds  # level px per thumbnail px
        out = np.empty((th, tw, 3), np.uint8)
        strip = max(1, int(1024 // max(f, 1.0)))  # thumbnail rows per strip (~1024 level rows)
        for j0 in range(0, th, strip):
            j1 = min(j0 + strip, th)
            ly0, ly1 = math.floor(j0 * f), min(math.ceil(j1 * f), lh)
            ly1 = max(ly1, ly0 + 1)
            region = self.read_region(0, round(ly0 * ds), lw, ly1 - ly0, level)
            box = (0.0, j0 * f - ly0, min(tw * f, lw), j1 * f - ly0)
            out[j0:j1] = np.asarray(
                Image.fromarray(region).resize((tw, j1 - j0), Image.Resampling.BOX, box=box)
            )
        return out, downsample


def _downsampled_dims(width: int, height: int, downsamples: Sequence[float]) -> tuple[tuple[int, int], ...]:
    return tuple((max(1, math.ceil(width / d)), max(1, math.ceil(height / d))) for d in downsamples)


class ArraySlide(SlideReader):
    """A virtual slide over an in-memory (H, W, 3) uint8 array; levels are strided views.

    Args:
        image: level-0 pixels (H, W, 3) uint8.
        mpp: microns per level-0 pixel (None = unknown).
        downsamples: integer downsample of each level (default: 1, 2, 4 while the level is >= 16 px).
        bounds_offset: (x, y) reported as the slide bounds (for testing offsets).
        path: name used in messages and as the slide id.
    """

    def __init__(
        self,
        image: np.ndarray,
        mpp: float | None = None,
        downsamples: Sequence[int] | None = None,
        bounds_offset: tuple[int, int] = (0, 0),
        path: str = "array",
    ) -> None:
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise InputError(f"ArraySlide expects an (H, W, 3) uint8 array, got {image.shape} {image.dtype}")
        self.image = image
        h, w = image.shape[:2]
        if downsamples is None:
            downsamples = [1]
            while len(downsamples) < 3 and min(h, w) // (downsamples[-1] * 2) >= 16:
                downsamples.append(downsamples[-1] * 2)
        self._ds = [int(d) for d in downsamples]
        self.level_downsamples = tuple(float(d) for d in self._ds)
        self.level_dimensions = _downsampled_dims(w, h, self._ds)
        self.mpp = mpp
        self.bounds_offset = bounds_offset
        self.path = path

    def _read(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        d = self._ds[level]
        lx, ly = x // d, y // d
        return np.ascontiguousarray(self.image[ly * d : (ly + h) * d : d, lx * d : (lx + w) * d : d])


class VirtualSlide(SlideReader):
    """A slide whose pixels are computed on demand by `fn(xs, ys) -> (h, w, 3) uint8`.

    `xs` (1, w) and `ys` (h, 1) are the level-0 coordinates of the sampled pixels, so a level-`k`
    read samples every `downsample`-th level-0 pixel. Nothing is stored: memory does not grow with
    the slide size (used by the memory benchmark).
    """

    def __init__(
        self,
        width: int,
        height: int,
        fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
        mpp: float | None = None,
        downsamples: Sequence[int] = (1, 4, 16),
        path: str = "virtual",
    ) -> None:
        self.fn = fn
        self._ds = [int(d) for d in downsamples]
        self.level_downsamples = tuple(float(d) for d in self._ds)
        self.level_dimensions = _downsampled_dims(width, height, self._ds)
        self.mpp = mpp
        self.path = path

    def _read(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        d = self._ds[level]
        xs = (x // d + np.arange(w, dtype=np.int64))[None, :] * d
        ys = (y // d + np.arange(h, dtype=np.int64))[:, None] * d
        return np.ascontiguousarray(self.fn(xs, ys), dtype=np.uint8)


def he_pattern(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """A cheap H&E-like test pattern: pink tissue with purple blobs and a white margin."""
    h, w = ys.shape[0], xs.shape[1]
    blobs = (np.sin(xs / 37.0) * np.cos(ys / 29.0)) > 0.6
    out = np.empty((h, w, 3), np.uint8)
    out[...] = (235, 160, 200)
    out[np.broadcast_to(blobs, (h, w))] = (120, 60, 160)
    margin = (xs < 256) | (ys < 256)
    out[np.broadcast_to(margin, (h, w))] = 255
    return out


class TiffSlideReader(SlideReader):
    """SVS / generic pyramidal TIFF through `tiffslide` (extra `slides`).

    Grey (1 sample) and grey + alpha slides are read as RGB (the grey value in every channel).
    Refused at opening (InputError naming the file): pixels other than 8-bit, and a level-0 layout
    whose smallest decodable unit (a strip or tile) needs more than `max_bytes`, since every read
    would decode it whole. A region that cannot be decoded (truncated or corrupt file) raises an
    InputError naming the file and the region.
    """

    def __init__(self, path: str | Path, mpp: float | None = None,
                 max_bytes: float | None = DEFAULT_MAX_BYTES) -> None:
        try:
            import tiffslide
        except ImportError as e:
            raise InputError(
                "reading TIFF/SVS slides needs the 'slides' extra: pip install \"ldiffusion[slides]\""
            ) from e
        self.path = str(path)
        try:
            self._slide = tiffslide.TiffSlide(self.path)
        except Exception as e:  # tiffslide raises several types for unreadable files
            raise InputError(f"{path}: cannot open slide with tiffslide ({e})") from e
        self.level_dimensions = tuple(tuple(int(v) for v in d) for d in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self._check_layout(max_bytes)
        props = self._slide.properties
        self.mpp = mpp if mpp is not None else _mpp_from_props(props, "tiffslide")
        self.bounds_offset = (
            int(props.get("tiffslide.bounds-x") or 0),
            int(props.get("tiffslide.bounds-y") or 0),
        )

    def _check_layout(self, max_bytes: float | None) -> None:
        """Refuse non-8-bit pixels and level-0 strips/tiles too large to decode (see the class)."""
        tif = getattr(self._slide, "ts_tifffile", None)
        if tif is None or not tif.series:
            return
        series = tif.series[0]
        if np.dtype(series.dtype) != np.uint8:
            self.close()
            raise InputError(
                f"{self.path}: pixels are {np.dtype(series.dtype).name}; expected 8-bit RGB (or grey) "
                "slides, convert the slide to 8 bits first"
            )
        page = series.levels[0].keyframe if series.levels else series.keyframe
        chunks = getattr(page, "chunks", None)
        if chunks:
            unit = "tile" if getattr(page, "is_tiled", False) else "strip"
            try:
                check_bytes(math.prod(int(c) for c in chunks), f"{self.path}: decoding one level-0 {unit} "
                            f"({' x '.join(str(int(c)) for c in chunks)})", max_bytes,
                            "the file is not tiled (or declares a size its data does not have); "
                            "convert it to a tiled pyramidal TIFF")
            except InputError:
                self.close()
                raise

    def _read(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        try:
            arr = np.asarray(self._slide.read_region((x, y), level, (w, h), as_array=True))
        except MemoryError:
            raise
        except Exception as e:  # tifffile/imagecodecs raise many types for truncated or corrupt data
            raise InputError(
                f"{self.path}: cannot read the region x={x}, y={y}, {w} x {h} px of level {level} "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                "the file is truncated or corrupt"
            ) from e
        if arr.ndim == 3 and arr.shape[-1] in (1, 2):  # grey or grey + alpha -> RGB
            arr = arr[..., 0]
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        return np.ascontiguousarray(arr[..., :3], dtype=np.uint8)

    def close(self) -> None:
        self._slide.close()


class OpenSlideReader(SlideReader):
    """Vendor formats (MRXS, NDPI, SCN, ...) via `openslide-python` + `openslide-bin` (extra `openslide`)."""

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        try:
            import openslide
        except ImportError as e:
            raise InputError(
                f"{path}: reading this slide format needs the 'openslide' extra: "
                'pip install "ldiffusion[openslide]"'
            ) from e
        self.path = str(path)
        try:
            self._slide = openslide.OpenSlide(self.path)
        except Exception as e:  # OpenSlideError, OpenSlideUnsupportedFormatError
            raise InputError(f"{path}: cannot open slide with OpenSlide ({e})") from e
        self.level_dimensions = tuple(tuple(int(v) for v in d) for d in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        props = self._slide.properties
        self.mpp = mpp if mpp is not None else _mpp_from_props(props, "openslide")
        bx, by = props.get("openslide.bounds-x"), props.get("openslide.bounds-y")
        self.bounds_offset = (int(bx or 0), int(by or 0))
        bw, bh = props.get("openslide.bounds-width"), props.get("openslide.bounds-height")
        self.bounds_size = (int(bw), int(bh)) if bw and bh else None

    def _read(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        rgba = np.asarray(self._slide.read_region((x, y), level, (w, h)))
        rgb = rgba[..., :3].astype(np.float32)
        alpha = rgba[..., 3:4].astype(np.float32) / 255.0  # transparent = outside the scan -> white
        return np.rint(rgb * alpha + 255.0 * (1 - alpha)).astype(np.uint8)

    def close(self) -> None:
        self._slide.close()


def _mpp_from_props(props: object, prefix: str) -> float | None:
    get = getattr(props, "get", lambda k, d=None: d)
    for key in (f"{prefix}.mpp-x", "openslide.mpp-x", "aperio.MPP"):
        v = get(key)
        if v not in (None, ""):
            try:
                val = float(v)
            except (TypeError, ValueError):
                continue
            if val > 0:
                return val
    return None


TIFF_SUFFIXES = (".svs", ".tif", ".tiff", ".btf", ".ndpi", ".qptiff")


def open_slide(path: str | Path, mpp: float | None = None,
               max_bytes: float | None = DEFAULT_MAX_BYTES) -> SlideReader:
    """Open a slide with the right back end.

    SVS/TIFF files go through tiffslide (falling back to OpenSlide when tiffslide cannot read
    them); every other suffix goes through OpenSlide.

    Args:
        path: slide file.
        mpp: microns per level-0 pixel; overrides the metadata (use it when the metadata lacks it).
        max_bytes: memory limit of one decoded strip/tile of a TIFF (None = no limit).

    Raises:
        InputError: the file is missing, unreadable, or the needed extra is not installed.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: slide file not found")
    if mpp is not None and not mpp > 0:
        raise InputError(f"mpp={mpp} should be > 0 (microns per level-0 pixel)")
    if path.suffix.lower() in TIFF_SUFFIXES:
        try:
            return TiffSlideReader(path, mpp=mpp, max_bytes=max_bytes)
        except InputError as tiff_error:
            if "cannot open slide" not in str(tiff_error):  # tiffslide opened it and refused it
                raise
            try:
                return OpenSlideReader(path, mpp=mpp)
            except InputError:
                raise tiff_error from None
    return OpenSlideReader(path, mpp=mpp)
