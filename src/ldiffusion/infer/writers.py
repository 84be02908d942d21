"""Slide outputs: pyramidal OME-TIFF label map, QuPath GeoJSON, per-class areas, PNG overlay.

All files are written atomically (temporary file beside the target, then `os.replace`) and are a
deterministic function of their inputs (the OME UUID is passed in), so a resumed run reproduces
an uninterrupted run byte for byte.

GeoJSON polygons follow pixel edges exactly: a pixel (col c, row r) is the square
[c, c+1] x [r, r+1], so a polygon contains a pixel iff it contains the pixel's centre, and
rasterising the polygons by centres gives back the label map (classes are 4-connected; pixels
touching only diagonally are separate objects). Holes are kept and every polygon is `is_valid`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from ldiffusion.core.errors import InputError
from ldiffusion.core.io import atomic_write_bytes, write_json
from ldiffusion.data.format import encode_png
from ldiffusion.data.qupath.geojson import palette_color, polygon_feature, write_feature_collection

logger = logging.getLogger(__name__)


def _require(name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise InputError(
            f"writing slide outputs needs {name!r} from the 'slides' extra: "
            'pip install "ldiffusion[slides]"'
        ) from e


# ---------------------------------------------------------------------- OME-TIFF


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[str]:
    """Yield a temporary path beside `path` (for writers that need a file name); move it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _iter_tiles(level: Any, tile_px: int) -> Iterator[np.ndarray]:
    """Yield (tile_px, tile_px) uint8 tiles of a 2-D array-like in row-major order (edges zero-padded)."""
    h, w = level.shape
    for y0 in range(0, h, tile_px):
        band = np.asarray(level[y0 : min(y0 + tile_px, h), :], dtype=np.uint8)
        for x0 in range(0, w, tile_px):
            t = band[:, x0 : x0 + tile_px]
            if t.shape != (tile_px, tile_px):
                t = np.pad(t, ((0, tile_px - t.shape[0]), (0, tile_px - t.shape[1])))
            yield np.ascontiguousarray(t)


def write_ome_tiff(
    path: str | Path,
    levels: Sequence[Any],
    *,
    mpp: float | None = None,
    tile_px: int = 256,
    compression: str = "zlib",
    uuid: str | None = None,
    name: str = "labels",
) -> None:
    """Write a tiled, compressed, pyramidal OME-TIFF (BigTIFF, levels as SubIFDs) of a uint8 label map.

    Args:
        path: destination `.ome.tif`.
        levels: label levels, finest first, each a 2-D uint8 array-like (numpy or zarr) read in bands.
        mpp: microns per pixel of level 0 (written as OME PhysicalSizeX/Y and TIFF resolution).
        tile_px: TIFF tile side (multiple of 16).
        compression: TIFF compression ("zlib"/"deflate", "zstd", ...).
        uuid: OME UUID (pass a fixed one for reproducible files; random when None).
        name: OME image name.
    """
    tifffile = _require("tifffile")
    h, w = levels[0].shape
    metadata: dict[str, Any] = {"axes": "YX", "Name": name}
    if uuid is not None:
        metadata["UUID"] = uuid
    if mpp is not None:
        metadata.update(
            PhysicalSizeX=float(mpp), PhysicalSizeXUnit="µm", PhysicalSizeY=float(mpp), PhysicalSizeYUnit="µm"
        )
    opts: dict[str, Any] = {
        "tile": (tile_px, tile_px),
        "compression": compression,
        "photometric": "minisblack",
        "dtype": np.uint8,
    }
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
        res: dict[str, Any] = {}
        if mpp is not None:
            res = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
        tif.write(
            _iter_tiles(levels[0], tile_px),
            shape=(h, w),
            subifds=len(levels) - 1,
            metadata=metadata,
            **res,
            **opts,
        )
        for lvl in levels[1:]:
            lh, lw = lvl.shape
            if mpp is not None:
                f = w / lw
                res = {"resolution": (1e4 / (mpp * f), 1e4 / (mpp * f)), "resolutionunit": "CENTIMETER"}
            tif.write(_iter_tiles(lvl, tile_px), shape=(lh, lw), subfiletype=1, **res, **opts)


# ---------------------------------------------------------------------- vectorisation


def _simplify_ring(pts: np.ndarray) -> np.ndarray:
    """Drop repeated and collinear vertices of a closed ring given without its closing point."""
    keep = np.any(pts != np.roll(pts, 1, axis=0), axis=1)
    pts = pts[keep]
    if len(pts) < 3:
        return pts
    d_prev = np.sign(pts - np.roll(pts, 1, axis=0))
    d_next = np.sign(np.roll(pts, -1, axis=0) - pts)
    return pts[np.any(d_prev != d_next, axis=1)]


def component_polygons(comp: np.ndarray, origin: tuple[int, int] = (0, 0)) -> list[Any]:
    """Return the exact pixel-edge polygon(s) of one 4-connected component.

    Args:
        comp: (h, w) bool mask of a single 4-connected component.
        origin: (x, y) added to the coordinates (the crop's position).

    Returns:
        Valid shapely polygons (one, or a few when a hole touches the outline at a corner).
    """
    shapely = _require("shapely")
    from skimage.measure import find_contours

    if comp.all():  # fast path: a filled rectangle
        x0, y0 = origin
        h, w = comp.shape
        return [shapely.box(x0, y0, x0 + w, y0 + h)]
    up = np.zeros((2 * comp.shape[0] + 4, 2 * comp.shape[1] + 4), np.float32)
    up[2:-2, 2:-2] = comp.repeat(2, axis=0).repeat(2, axis=1)
    rings = []
    for c in find_contours(up, 0.5, fully_connected="low"):
        # up-pixel index k has its centre at pixel-edge coordinate (k + 0.5) / 2 (minus the pad); the
        # marching-squares vertices land on quarter positions that round to the true pixel corners.
        pts = np.rint((c[:-1, ::-1] + 0.5) / 2 - 1).astype(np.int64)
        pts = _simplify_ring(pts)
        if len(pts) >= 3:
            rings.append(pts + np.asarray(origin, dtype=np.int64))
    if not rings:
        return []
    areas = [abs(_signed_area(r)) for r in rings]
    k = int(np.argmax(areas))
    shell = rings[k]
    holes = [r for i, r in enumerate(rings) if i != k]
    poly = shapely.Polygon(shell, holes)
    if poly.is_valid:
        return [poly]
    fixed = shapely.make_valid(poly)
    return [g for g in shapely.get_parts(fixed) if g.geom_type == "Polygon" and g.area > 0]


def _signed_area(pts: np.ndarray) -> float:
    x, y = pts[:, 0].astype(np.float64), pts[:, 1].astype(np.float64)
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def iter_class_polygons(
    labels: Any, classes: Sequence[int], block_px: int = 2048
) -> Iterator[tuple[int, Any]]:
    """Yield `(class id, polygon)` for every 4-connected object of each class, in pixel-edge coordinates.

    The label map is read in `block_px` blocks, so memory is bounded by a block and the objects
    that cross block borders; those pieces are merged per class with an exact union (integer
    coordinates) at the end.

    Args:
        labels: (H, W) integer array-like (numpy or zarr).
        classes: class ids to vectorise (typically all but background 0).
        block_px: block side.
    """
    shapely = _require("shapely")
    H, W = labels.shape
    open_parts: dict[int, list[Any]] = {c: [] for c in classes}
    four = ndimage.generate_binary_structure(2, 1)
    for by0 in range(0, H, block_px):
        by1 = min(by0 + block_px, H)
        for bx0 in range(0, W, block_px):
            bx1 = min(bx0 + block_px, W)
            block = np.asarray(labels[by0:by1, bx0:bx1])
            bh, bw = block.shape
            for c in classes:
                mask = block == c
                if not mask.any():
                    continue
                lab, _ = ndimage.label(mask, structure=four)
                for i, sl in enumerate(ndimage.find_objects(lab), start=1):
                    if sl is None:
                        continue
                    ys, xs = sl
                    touches = (
                        (ys.start == 0 and by0 > 0)
                        or (ys.stop == bh and by1 < H)
                        or (xs.start == 0 and bx0 > 0)
                        or (xs.stop == bw and bx1 < W)
                    )
                    polys = component_polygons(lab[sl] == i, origin=(bx0 + xs.start, by0 + ys.start))
                    if touches:
                        open_parts[c].extend(polys)
                    else:
                        for p in polys:
                            yield c, p
    for c in classes:
        if open_parts[c]:
            merged = shapely.union_all(open_parts[c])
            for p in shapely.get_parts(merged):
                if p.geom_type == "Polygon" and p.area > 0:
                    yield c, p


def write_geojson(
    path: str | Path,
    labels: Any,
    class_names: Sequence[str],
    palette: np.ndarray,
    *,
    scale: float = 1.0,
    offset: tuple[float, float] = (0.0, 0.0),
    skip: Sequence[int] = (0,),
    block_px: int = 2048,
    object_type: str = "annotation",
    grow_px: int = 0,
    min_area_px: float = 0,
) -> dict[str, int]:
    """Write a QuPath GeoJSON FeatureCollection with one polygon Feature per object of each class.

    Args:
        path: destination `.geojson`.
        labels: (H, W) label map (numpy or zarr), pixel i -> level-0 `offset + scale * i`.
        class_names, palette: name and (K, 3) uint8 colour of each class id.
        scale: level-0 pixels per label pixel.
        offset: level-0 (x, y) of the label map's origin in the coordinate frame wanted (e.g. minus
            the slide bounds for QuPath, which shows bounded slides cropped).
        skip: class ids not written (background).
        block_px: vectorisation block side.
        grow_px: grow every polygon by this many label pixels (mitred, so pixel-edge polygons keep
            integer corners): a model trained with the contour target predicts object interiors
            separated by a boundary band of this width, and its objects are the grown interiors.
        min_area_px: drop polygons whose area (after growing) is under this many label pixels, as
            `min_object_px` drops small instances in `predict`.

    Returns:
        Number of features per class name.
    """
    classes = [c for c in range(len(class_names)) if c not in set(skip)]
    counts = dict.fromkeys((class_names[c] for c in classes), 0)

    def features() -> Iterator[dict[str, Any]]:
        for c, poly in iter_class_polygons(labels, classes, block_px=block_px):
            if grow_px > 0:
                poly = poly.buffer(grow_px, join_style="mitre")
            if poly.area < min_area_px:
                continue
            counts[class_names[c]] += 1
            yield polygon_feature(
                poly, class_names[c], palette[c], scale=scale, offset=offset, object_type=object_type
            )

    write_feature_collection(path, features())
    return counts


# ---------------------------------------------------------------------- statistics and overlay


def class_counts(labels: Any, num_classes: int, block_px: int = 1024) -> np.ndarray:
    """Return the pixel count of each class id 0..K-1 of a label map, read in blocks."""
    H, W = labels.shape
    counts = np.zeros(max(num_classes, 1), dtype=np.int64)
    for y0 in range(0, H, block_px):
        for x0 in range(0, W, block_px):
            block = np.asarray(labels[y0 : min(y0 + block_px, H), x0 : min(x0 + block_px, W)])
            counts += np.bincount(block.ravel(), minlength=len(counts))[: len(counts)]
    return counts


def area_stats(
    counts: np.ndarray,
    class_names: Sequence[str],
    *,
    label_mpp: float | None,
    level0_px_per_label_px: float = 1.0,
) -> dict[str, Any]:
    """Per-class areas: pixels of the label map, level-0 pixels, mm^2 (when `label_mpp` is known), fraction.

    The fraction of class k is its share of the non-background (class > 0) area.
    """
    fg = int(counts[1:].sum())
    classes = []
    for k, name in enumerate(class_names):
        n = int(counts[k]) if k < len(counts) else 0
        classes.append(
            {
                "id": k,
                "name": name,
                "pixels": n,
                "area_px_level0": n * level0_px_per_label_px**2,
                "area_mm2": (n * label_mpp**2 * 1e-6) if label_mpp else None,
                "fraction_of_foreground": (n / fg) if (k > 0 and fg) else None,
            }
        )
    return {
        "label_mpp": label_mpp,
        "level0_px_per_label_px": level0_px_per_label_px,
        "total_pixels": int(counts.sum()),
        "foreground_pixels": fg,
        "classes": classes,
    }


def write_stats(path: str | Path, stats: dict[str, Any]) -> None:
    """Write area statistics as JSON atomically."""
    write_json(path, stats)


def blend_overlay(
    image: np.ndarray, labels: np.ndarray, palette: np.ndarray, alpha: float = 0.45
) -> np.ndarray:
    """Blend class colours (class 0 untouched) over an (h, w, 3) uint8 image of the same size."""
    pal = np.asarray(palette, dtype=np.float32)
    colour = pal[np.clip(labels, 0, len(pal) - 1)]
    out = image.astype(np.float32)
    fg = (labels > 0)[..., None]
    out = np.where(fg, (1 - alpha) * out + alpha * colour, out)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def nearest_resize(labels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize a 2-D label array to (height, width) by nearest neighbour (pixel centres)."""
    h, w = labels.shape
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.int64), w - 1)
    return labels[rows[:, None], cols[None, :]]


def write_overlay_png(
    path: str | Path, image: np.ndarray, labels: np.ndarray, palette: np.ndarray, alpha: float = 0.45
) -> None:
    """Write a PNG of `labels` (resized to the image) blended over `image`."""
    if labels.shape != image.shape[:2]:
        labels = nearest_resize(labels, image.shape[1], image.shape[0])
    out = np.empty_like(image)
    for y0 in range(0, image.shape[0], 256):  # in strips: no full-size float copies
        out[y0 : y0 + 256] = blend_overlay(image[y0 : y0 + 256], labels[y0 : y0 + 256], palette, alpha)
    atomic_write_bytes(path, encode_png(out))


def pick_level(levels: Sequence[Any], max_px: int) -> Any:
    """Return the finest level whose longer side is <= 2 * `max_px` (else the coarsest)."""
    for lvl in levels:
        if max(lvl.shape) <= 2 * max_px:
            return lvl
    return levels[-1]


def default_palette(num_classes: int) -> np.ndarray:
    """A fixed (K, 3) uint8 palette: black background, then distinct colours (the QuPath import's)."""
    return np.array([palette_color(i) for i in range(num_classes)], dtype=np.uint8)


def ome_uuid(*parts: Any) -> str:
    """A deterministic UUID (version 5) from printable parts."""
    import uuid

    return str(uuid.uuid5(uuid.NAMESPACE_URL, "ldiffusion:" + "|".join(str(p) for p in parts)))


__all__ = [
    "area_stats",
    "atomic_path",
    "class_counts",
    "component_polygons",
    "default_palette",
    "iter_class_polygons",
    "ome_uuid",
    "polygon_feature",
    "write_geojson",
    "write_ome_tiff",
    "write_overlay_png",
    "write_stats",
]
