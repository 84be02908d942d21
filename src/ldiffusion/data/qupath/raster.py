"""Polygon rasterisation in the pixel frame of a tile (the pixel rule of the package docstring)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
from skimage.draw import polygon as draw_polygon

from ldiffusion.core.errors import InputError
from ldiffusion.data.qupath.geojson import SNAP_DECIMALS, _shapely

logger = logging.getLogger(__name__)

def ring_to_pixels(
    coords: Any, origin: tuple[float, float] = (0.0, 0.0), downsample: float = 1.0, pixel_centre: float = 0.5
) -> np.ndarray:
    """Map ring coordinates to the tile's pixel-index frame (see the module docstring).

    Args:
        coords: (N, 2) x, y of a ring (a repeated closing vertex is dropped).
        origin: level-0 (x, y) of the tile's top-left pixel, in the coordinates' frame.
        downsample: level-0 pixels per tile pixel.
        pixel_centre: 0.5 (QuPath) or 0 (Aperio/MoNuSeg), see the module docstring.

    Returns:
        (N, 2) float64 (col, row): tile pixel (c, r) is filled when (c, r) is inside the ring.
    """
    xy = np.asarray(coords, dtype=np.float64)[:, :2]
    if len(xy) > 1 and np.array_equal(xy[0], xy[-1]):
        xy = xy[:-1]
    return _to_pixels(xy, origin, downsample, pixel_centre)


def _to_pixels(
    xy: np.ndarray, origin: tuple[float, float], downsample: float, pixel_centre: float
) -> np.ndarray:
    ox, oy = origin
    if downsample == 1.0:
        cr = np.stack([(xy[:, 0] - ox) - pixel_centre, (xy[:, 1] - oy) - pixel_centre], axis=1)
    else:
        d = float(downsample)
        cr = np.stack(
            [
                ((xy[:, 0] - ox) - pixel_centre + 0.5) / d - 0.5,
                ((xy[:, 1] - oy) - pixel_centre + 0.5) / d - 0.5,
            ],
            axis=1,
        )
    # snap to 1e-9 px: removes the float noise of slide offsets (x + offset - offset != x), so a
    # vertex written with up to 9 decimals is rasterised as in its source image
    return np.round(cr, SNAP_DECIMALS)


def polygon_pixels(
    geom: Any,
    shape: tuple[int, int],
    *,
    origin: tuple[float, float] = (0.0, 0.0),
    downsample: float = 1.0,
    pixel_centre: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Return the `(rows, cols)` of the pixels of a (Multi)Polygon in an (H, W) tile.

    A pixel is in when its sample point lies inside an exterior ring or on its boundary
    (`skimage.draw.polygon`, as the MoNuSeg converter) and not strictly inside a hole.

    Example:
        >>> import shapely
        >>> square = shapely.box(0, 0, 2, 2)       # covers pixels 0..1 x 0..1 in QuPath's frame
        >>> rr, cc = polygon_pixels(square, (4, 4))
        >>> sorted(zip(rr.tolist(), cc.tolist()))
        [(0, 0), (0, 1), (1, 0), (1, 1)]
    """
    shapely = _shapely()
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    parts = [p for g in shapely.get_parts(geom) for p in shapely.get_parts(g)]
    for part in parts:
        if part.is_empty:
            continue
        if part.geom_type in ("LineString", "LinearRing", "Point"):
            rr, cc = _vertex_pixels(part, shape, origin, downsample, pixel_centre)
            rows.append(rr)
            cols.append(cc)
            continue
        if part.geom_type != "Polygon":
            continue
        ext = ring_to_pixels(part.exterior.coords, origin, downsample, pixel_centre)
        if len(ext) < 3:
            continue
        rr, cc = draw_polygon(ext[:, 1], ext[:, 0], shape=shape)
        if len(rr) and len(part.interiors):
            r0, c0 = int(rr.min()), int(cc.min())
            local = np.zeros((int(rr.max()) - r0 + 1, int(cc.max()) - c0 + 1), dtype=bool)
            local[rr - r0, cc - c0] = True
            for ring in part.interiors:
                hole = ring_to_pixels(ring.coords, origin, downsample, pixel_centre)
                if len(hole) < 3:
                    continue
                hr, hc = np.nonzero(local)
                inside = shapely.contains_xy(shapely.Polygon(hole), hc + c0, hr + r0)  # strict interior
                local[hr[inside], hc[inside]] = False
            rr, cc = np.nonzero(local)
            rr, cc = rr + r0, cc + c0
        rows.append(rr)
        cols.append(cc)
    if not rows:
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    return np.concatenate(rows), np.concatenate(cols)


def _vertex_pixels(
    part: Any, shape: tuple[int, int], origin: tuple[float, float], downsample: float, pixel_centre: float
) -> tuple[np.ndarray, np.ndarray]:
    """Pixels whose sample point is exactly a vertex of a collapsed (zero-width) part."""
    cr = _to_pixels(np.asarray(part.coords, dtype=np.float64)[:, :2], origin, downsample, pixel_centre)
    on = (cr == np.round(cr)).all(axis=1)
    cr = np.round(cr[on]).astype(np.intp)
    inside = (cr[:, 0] >= 0) & (cr[:, 0] < shape[1]) & (cr[:, 1] >= 0) & (cr[:, 1] < shape[0])
    return cr[inside, 1], cr[inside, 0]


@dataclasses.dataclass(frozen=True)
class PaintItem:
    """One geometry painted into a tile: its label `value` (class id, 0 region, 255 ignore)."""

    geometry: Any
    value: int
    instance: bool = False


def rasterise(
    items: Iterable[PaintItem],
    shape: tuple[int, int],
    *,
    origin: tuple[float, float] = (0.0, 0.0),
    downsample: float = 1.0,
    pixel_centre: float = 0.5,
    ignore_index: int = 255,
    with_instances: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Paint `items` in order (later ones win) into an (H, W) tile that starts as `ignore_index`.

    Args:
        items: geometries in paint order.
        shape: (H, W) of the tile.
        origin, downsample, pixel_centre: see `ring_to_pixels`.
        ignore_index: value of pixels no item covers.
        with_instances: also return an instance map: items with `instance=True` get ids 1, 2, ...
            in paint order; other items clear the instance map where they paint.

    Returns:
        `(label (H, W) uint8, inst (H, W) uint16 or None)`.

    Raises:
        InputError: more than 65535 instances in one tile.
    """
    label = np.full(shape, ignore_index, dtype=np.uint8)
    inst = np.zeros(shape, dtype=np.uint16) if with_instances else None
    k = 0
    for it in items:
        rr, cc = polygon_pixels(
            it.geometry, shape, origin=origin, downsample=downsample, pixel_centre=pixel_centre
        )
        if not len(rr):
            continue
        label[rr, cc] = it.value
        if inst is not None:
            if it.instance:
                k += 1
                if k > 65535:
                    raise InputError(f"more than 65535 objects in one tile at {origin}; use a smaller --tile")
                inst[rr, cc] = k
            else:
                inst[rr, cc] = 0
    return label, inst
