"""Tile grids on a slide, and finding slides, annotation files and which belongs to which."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from ldiffusion.core.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

ANNOTATION_SUFFIXES = (".geojson", ".json")
SLIDE_SUFFIXES = (
    ".svs",
    ".tif",
    ".tiff",
    ".btf",
    ".ndpi",
    ".qptiff",
    ".mrxs",
    ".scn",
    ".vms",
    ".vmu",
    ".bif",
    ".svslide",
)
Grid = Literal["slide", "region"]


def _starts(n: int, tile_px: int) -> list[int]:
    """Non-overlapping starts covering [0, n); the last tile is flush with the end (overlaps when needed)."""
    if n <= tile_px:
        return [0]
    starts = list(range(0, n - tile_px + 1, tile_px))
    if starts[-1] != n - tile_px:
        starts.append(n - tile_px)
    return starts


def _pixel_span(lo: float, hi: float, downsample: float, pixel_centre: float) -> tuple[int, int]:
    """Working-pixel indices (first, last) whose sample points lie in [lo, hi] (level-0 coordinates)."""
    d = float(downsample)
    first = math.ceil((lo - pixel_centre + 0.5) / d - 0.5)
    last = math.floor((hi - pixel_centre + 0.5) / d - 0.5)
    return first, last


def tile_origins(
    width0: int,
    height0: int,
    tile_px: int,
    downsample: float = 1.0,
    *,
    grid: Grid = "slide",
    regions: Sequence[tuple[float, float, float, float]] = (),
    pixel_centre: float = 0.5,
) -> list[tuple[int, int]]:
    """Return the level-0 (x, y) origins of the tiles to cut, sorted by (y, x).

    Args:
        width0, height0: level-0 size of the slide.
        tile_px: tile side in working pixels.
        downsample: level-0 pixels per working pixel.
        grid: "slide": one grid over the whole slide from (0, 0); "region": one grid per region
            (level-0 bounds `(minx, miny, maxx, maxy)`), starting at its first pixel, so a region of
            exactly `tile_px` working pixels gives exactly one tile.
        regions: region bounds for `grid="region"`.
        pixel_centre: see the module docstring (decides a region's first pixel).

    Example:
        >>> tile_origins(1000, 600, 512)
        [(0, 0), (488, 0), (0, 88), (488, 88)]
        >>> tile_origins(5000, 5000, 1000, grid="region", regions=[(256, 256, 1256, 1256)])
        [(256, 256)]
    """
    if tile_px < 1:
        raise InputError(f"tile_px={tile_px} should be >= 1")
    if grid not in ("slide", "region"):
        raise ConfigError(f"grid={grid!r} is not valid; choose 'slide' or 'region'")
    d = float(downsample)
    out: set[tuple[int, int]] = set()
    if grid == "slide":
        w, h = max(1, math.ceil(width0 / d)), max(1, math.ceil(height0 / d))
        for ty in _starts(h, tile_px):
            for tx in _starts(w, tile_px):
                out.add((round(tx * d), round(ty * d)))
    else:
        for minx, miny, maxx, maxy in regions:
            cx0, cx1 = _pixel_span(minx, maxx, d, pixel_centre)
            cy0, cy1 = _pixel_span(miny, maxy, d, pixel_centre)
            if cx1 < cx0 or cy1 < cy0:
                continue
            for ty in _starts(cy1 - cy0 + 1, tile_px):
                for tx in _starts(cx1 - cx0 + 1, tile_px):
                    out.add((round((cx0 + tx) * d), round((cy0 + ty) * d)))
    return sorted(out, key=lambda p: (p[1], p[0]))


class SlideSource(Protocol):
    """What `prepare_qupath` needs from an open slide (e.g. `ldiffusion.infer.slide.SlideReader`)."""

    path: str
    mpp: float | None
    bounds_offset: tuple[int, int]

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        ...

    def read_scaled(self, x: int, y: int, w: int, h: int, downsample: float) -> np.ndarray:
        """Return (h, w, 3) uint8 pixels at `downsample` with top-left (x, y) in level-0 px."""
        ...

    def close(self) -> None:
        """Release the file."""
        ...


def slide_stem(path: str | Path) -> str:
    """Return a slide's name without its (double) suffix ("a.ome.tif" -> "a")."""
    name = Path(path).name
    for suf in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return Path(name).stem


def _annotation_key(path: Path) -> str:
    name = path.name
    for suf in ANNOTATION_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return path.stem


def find_slides(paths: Sequence[str | Path]) -> dict[str, Path]:
    """Return slide stem -> file for files and folders (their slide files) in `paths`.

    Raises:
        InputError: a path that does not exist, no slide at all, or two slides with one stem.
    """
    found: dict[str, Path] = {}
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in SLIDE_SUFFIXES)
        elif p.exists():
            files = [p]
        else:
            raise InputError(f"--slides {p}: not found; give slide files or folders of slides")
        for f in files:
            stem = slide_stem(f)
            if stem in found and found[stem] != f:
                raise InputError(
                    f"two slides have the stem {stem!r}: {found[stem]} and {f}; annotations are "
                    "matched by stem, so rename one"
                )
            found[stem] = f
    if not found:
        raise InputError(
            f"--slides {[str(p) for p in paths]}: no slide files found (suffixes {', '.join(SLIDE_SUFFIXES)})"
        )
    return found


def find_annotations(path: str | Path) -> dict[str, Path]:
    """Return annotation key (file name without .geojson/.json) -> file for a file or folder."""
    path = Path(path)
    if path.is_dir():
        files = sorted(
            f for f in path.iterdir() if f.is_file() and f.name.lower().endswith(ANNOTATION_SUFFIXES)
        )
    elif path.is_file():
        files = [path]
    else:
        raise InputError(
            f"--annotations {path}: not found; give a folder of QuPath GeoJSON exports or one file"
        )
    if not files:
        raise InputError(f"--annotations {path}: no .geojson or .json files found")
    return {_annotation_key(f): f for f in files}


def match_annotations(slides: dict[str, Path], annotations: dict[str, Path]) -> list[tuple[str, Path, Path]]:
    """Pair annotation files with slides by stem ("a.geojson" or QuPath's "a.svs.geojson" -> slide "a").

    Returns:
        `(slide stem, slide file, annotation file)` sorted by stem.

    Raises:
        InputError: no pair at all, or two annotation files for one slide.
    """
    pairs: dict[str, tuple[Path, Path]] = {}
    unmatched = []
    for key, ann in sorted(annotations.items()):
        stem = (
            key if key in slides else slide_stem(key) if Path(key).suffix.lower() in SLIDE_SUFFIXES else None
        )
        if stem is None or stem not in slides:
            unmatched.append(ann.name)
            continue
        if stem in pairs:
            raise InputError(f"two annotation files for slide {stem!r}: {pairs[stem][1]} and {ann}")
        pairs[stem] = (slides[stem], ann)
    if not pairs:
        raise InputError(
            f"no annotation file matches a slide by stem; annotations {sorted(annotations)[:10]}, "
            f"slides {sorted(slides)[:10]}"
        )
    if unmatched:
        logger.warning("annotation files without a slide (skipped): %s", unmatched[:10])
    missing = sorted(set(slides) - set(pairs))
    if missing:
        logger.info("slides without annotations (skipped): %s", missing[:10])
    return [(s, *pairs[s]) for s in sorted(pairs)]
