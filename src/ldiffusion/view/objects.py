"""Objects of `annotations.geojson`: a spatial index, outline tiles, and the object under a point.

GeoJSON coordinates are converted to level-0 pixels once (`offset` is added: the slide's bounds
offset when the file is in QuPath's frame, `--coords qupath`), then held in a shapely STRtree, so
an outline tile or a hover query touches only the objects near it, whatever their number.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ldiffusion.core.errors import InputError

#: outline tiles are drawn only when an object is at least this many screen pixels per level-0 pixel
#: apart, i.e. at downsamples <= this value (coarser: transparent tiles)
MAX_OUTLINE_DOWNSAMPLE = 8


class ObjectIndex:
    """The polygons of a QuPath GeoJSON FeatureCollection in level-0 pixels, spatially indexed.

    Args:
        path: `annotations.geojson`.
        offset: level-0 (x, y) added to every coordinate.
        class_ids: class name -> id (names not in it get id -1).
    """

    def __init__(self, path: str | Path, offset: tuple[float, float], class_ids: dict[str, int]) -> None:
        try:
            import shapely
            from shapely.geometry import shape
        except ImportError as e:
            raise InputError(
                "showing objects needs shapely from the 'slides' extra: pip install \"ldiffusion[slides]\""
            ) from e
        self.path = str(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: cannot read GeoJSON ({e})") from e
        feats = data.get("features") if isinstance(data, dict) else None
        if not isinstance(feats, list):
            raise InputError(f"{path}: expected a GeoJSON FeatureCollection with a 'features' list")
        geoms, names, colours = [], [], []
        for feat in feats:
            try:
                g = shape(feat["geometry"])
            except (KeyError, TypeError, ValueError, AttributeError):
                continue
            if g.is_empty:
                continue
            cls = (feat.get("properties") or {}).get("classification") or {}
            geoms.append(shapely.transform(g, lambda xy: xy + np.asarray(offset, dtype=np.float64)))
            names.append(str(cls.get("name", "")))
            colours.append(tuple(int(v) for v in cls.get("color", (255, 255, 0)))[:3])
        self.geoms = np.array(geoms, dtype=object)
        self.names = names
        self.colours = colours
        self.class_id = np.array([class_ids.get(n, -1) for n in names], dtype=np.int64)
        self.tree = shapely.STRtree(self.geoms)
        self._shapely = shapely

    def __len__(self) -> int:
        return len(self.geoms)

    def class_colours(self) -> dict[str, tuple[int, int, int]]:
        """The colour of each class name (first object of the class)."""
        out: dict[str, tuple[int, int, int]] = {}
        for n, c in zip(self.names, self.colours, strict=True):
            out.setdefault(n, c)
        return out

    def outline_tile(self, x0: float, y0: float, w: int, h: int, ds: float) -> np.ndarray:
        """RGBA (h, w, 4) outlines (class colours, 1 px) of the objects in a level-0 tile region."""
        img = Image.new("RGBA", (w, h), (0, 0, 0, 0))
        if ds > MAX_OUTLINE_DOWNSAMPLE or not len(self.geoms):
            return np.asarray(img)
        shapely = self._shapely
        hits = self.tree.query(shapely.box(x0, y0, x0 + w * ds, y0 + h * ds))
        if not len(hits):
            return np.asarray(img)
        parts, part_of = shapely.get_parts(self.geoms[hits], return_index=True)
        rings, ring_of = shapely.get_rings(parts, return_index=True)
        xy, point_of = shapely.get_coordinates(rings, return_index=True)
        xy = (xy - (x0, y0)) / ds
        starts = np.searchsorted(point_of, np.arange(len(rings) + 1))
        owner = hits[part_of[ring_of]]
        draw = ImageDraw.Draw(img)
        for r in range(len(rings)):
            pts = xy[starts[r] : starts[r + 1]]
            draw.line(pts.ravel().tolist(), fill=(*self.colours[owner[r]], 255), width=1)
        return np.asarray(img)

    def at(self, x: float, y: float) -> int | None:
        """Index of the (smallest) object containing level-0 point `(x, y)`, or None."""
        pt = self._shapely.Point(x, y)
        hits = [i for i in self.tree.query(pt).tolist() if self.geoms[i].covers(pt)]
        if not hits:
            return None
        return min(hits, key=lambda i: self.geoms[i].area)

    def mean_over(self, i: int, values: Any, origin: tuple[float, float], scale: float) -> float | None:
        """Mean of a map (e.g. uncertainty, a `LabelPyramid`) over object `i`, /255; None when empty.

        Map pixel `k` covers level-0 `[origin + k * scale, origin + (k + 1) * scale)`; a pixel counts
        when its centre lies in the polygon (read from a coarser level for large objects).
        """
        g = self.geoms[i]
        bx0, by0, bx1, by1 = g.bounds
        mx0 = int(np.floor((bx0 - origin[0]) / scale))
        my0 = int(np.floor((by0 - origin[1]) / scale))
        mx1 = int(np.ceil((bx1 - origin[0]) / scale))
        my1 = int(np.ceil((by1 - origin[1]) / scale))
        mh, mw = values.shape
        mx0, my0, mx1, my1 = max(mx0, 0), max(my0, 0), min(mx1, mw), min(my1, mh)
        if mx1 <= mx0 or my1 <= my0:
            return None
        block, r = values.read_box(mx0, my0, mx1, my1)
        bh, bw = block.shape
        if not bh or not bw:
            return None
        jx = (mx0 // r + np.arange(bw) + 0.5) * r * scale + origin[0]
        jy = (my0 // r + np.arange(bh) + 0.5) * r * scale + origin[1]
        gx, gy = np.meshgrid(jx, jy)
        inside = self._shapely.contains_xy(g, gx, gy)
        if not inside.any():
            return None
        return float(block[inside].mean()) / 255.0

    def describe(self, i: int, mpp: float | None) -> dict[str, Any]:
        """Class, area (level-0 px and µm²) and perimeter of object `i`."""
        g = self.geoms[i]
        area_px = float(g.area)
        return {
            "index": int(i),
            "class": self.names[i],
            "class_id": int(self.class_id[i]),
            "area_px": area_px,
            "area_um2": area_px * mpp**2 if mpp else None,
            "perimeter_um": float(g.length) * mpp if mpp else None,
            "bounds": [float(v) for v in g.bounds],
        }


class LazyObjects:
    """Build an `ObjectIndex` once, on first use, in a thread-safe way (the GeoJSON can be large)."""

    def __init__(self, path: str | Path, offset: tuple[float, float], class_ids: dict[str, int]) -> None:
        self.path, self.offset, self.class_ids = Path(path), offset, class_ids
        self._index: ObjectIndex | None = None
        self._lock = threading.Lock()

    def get(self) -> ObjectIndex:
        """The index (built on the first call)."""
        with self._lock:
            if self._index is None:
                self._index = ObjectIndex(self.path, self.offset, self.class_ids)
            return self._index


__all__ = ["MAX_OUTLINE_DOWNSAMPLE", "LazyObjects", "ObjectIndex"]
