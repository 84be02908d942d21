"""QuPath GeoJSON annotations <-> ldiffusion data sets.

Two directions:

- `prepare_qupath`: read QuPath GeoJSON exports (one file per slide, matched by file stem), map
  their class names to ids, rasterise them on a tile grid at the requested mpp and write a data
  set in the standard layout (`ldiffusion.data.format`). Slides are read through a `SlideSource`
  (anything with `dimensions`, `mpp`, `bounds_offset`, `read_scaled`, `close`, such as
  `ldiffusion.infer.slide.open_slide(path)`), which the caller passes in: the `data` layer does not
  import `infer`.
- `export_aperio_xml`: convert Aperio ImageScope XML (MoNuSeg) into QuPath GeoJSON, with an offset
  and scale so that the objects of an image placed into a stitched slide land at their slide
  coordinates.

**GeoJSON accepted.** A `FeatureCollection`, a bare array of features or a single `Feature`;
`properties.objectType` "annotation" / "detection" / "cell" (QuPath 0.2's feature `id`
"PathAnnotationObject" etc. also works; missing = annotation); `properties.classification` as
`{"name", "color"}` (colour `[r, g, b]` or a packed (A)RGB int) or a plain name string; a feature
without classification has the name "Unclassified". `Polygon` and `MultiPolygon` (holes kept),
and the polygonal parts of a `GeometryCollection`; points and lines are skipped with a warning.
Invalid geometry is repaired with `shapely.make_valid`, with a warning naming the feature; the
zero-width parts it splits off (a spike "A -> B -> A" becomes a line) are kept and fill the pixels
whose sample point is one of their vertices, as the unrepaired outline would.
Coordinates are level-0 pixels in QuPath's frame (`coords="qupath"`: level 0 minus the slide's
bounds offset, which is (0, 0) for TIFF/SVS) or raw level 0 (`coords="level0"`).

**Pixel convention.** A polygon is rasterised exactly like the MoNuSeg converter's
`rasterise_polygons`: `skimage.draw.polygon` on the exterior ring fills every pixel whose *sample
point* lies inside the ring or on its boundary; pixels whose sample point lies *strictly* inside a
hole are then cleared (a hole's boundary belongs to the polygon). The sample point of level-0
pixel (col c, row r) is `(c + pixel_centre, r + pixel_centre)`:

- `pixel_centre=0.5` (default): QuPath's frame, where pixel (c, r) is the square [c, c+1] x
  [r, r+1] (as in QuPath, and as in the GeoJSON written by `slide predict`);
- `pixel_centre=0`: the frame of Aperio XML as the MoNuSeg converter reads it (centres at
  integer coordinates). `export_aperio_xml(half_pixel=True)` adds 0.5 to every XML coordinate,
  so its output rasterised with the default convention fills exactly the pixels the MoNuSeg
  converter fills.

At a downsample d (`mpp / slide mpp`), working pixel c of a tile whose level-0 origin is x0 covers
level-0 pixels [x0 + c d, x0 + (c + 1) d) and is sampled at their centre,
`x0 + (c + 0.5) d - 0.5 + pixel_centre`. Vertices are mapped to the tile's pixel frame and rounded
to 1e-9 px, so the float noise of slide offsets cannot move a pixel centre across an outline.

**Labels.** Each tile starts as `ignore_index` 255 (not annotated). Then, in this order: features
of a *region class* (`region_classes`, default QuPath's "Region*") fill 0 = background, marking
the annotated area; class features fill their class id (annotations first, then detections and
cells; in document order, or larger first with `paint_order="area"`; later ones win); features of
an *ignore class* (default QuPath's "Ignore*") fill 255 last. So without a region, only pixels
inside class features are labelled and everything else is ignored. Tiles without any labelled
pixel are skipped. With `instances=True` every class feature is also an object of the instance
map (uint16, ids 1..n per tile in paint order; 0 = none).

**Class ids.** From `classes` (a JSON file, see `read_class_file`), else from the names found:
background 0, then the sorted names 1..n with their QuPath colours. A name "background" (any
case) is id 0. With a class file, a name that is in neither the file nor the region/ignore classes
is an error that lists the names found.

Example:
    >>> from ldiffusion.infer.slide import open_slide                            # doctest: +SKIP
    >>> info = prepare_qupath("exports/", "data/qupath", slides=["slides/"],       # doctest: +SKIP
    ...                       open_slide=open_slide, mpp=0.5, tile_px=512)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from skimage.draw import polygon as draw_polygon

from ldiffusion.core.errors import ConfigError, InputError
from ldiffusion.core.io import atomic_write
from ldiffusion.core.registry import suggest
from ldiffusion.data.format import ClassInfo, DatasetInfo
from ldiffusion.data.staging import staged

logger = logging.getLogger(__name__)

NAME = "qupath"
VERSION = 1

UNCLASSIFIED = "Unclassified"
DEFAULT_REGION_CLASSES = ("Region*",)
DEFAULT_IGNORE_CLASSES = ("Ignore*",)
DEFAULT_OBJECT_TYPES = ("annotation", "detection", "cell")
#: QuPath 0.2 wrote the object type as the feature "id"
_LEGACY_TYPES = {
    "PathAnnotationObject": "annotation",
    "PathDetectionObject": "detection",
    "PathCellObject": "cell",
    "PathTileObject": "tile",
    "TMACoreObject": "tma_core",
}
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
#: QuPath's colours of its built-in classes
REGION_COLOR = (0, 0, 180)
IGNORE_COLOR = (180, 180, 180)
#: pixel-frame coordinates are rounded to this many decimals before rasterising
SNAP_DECIMALS = 9
#: warnings per file before they are summarised
MAX_WARNINGS = 20

Grid = Literal["slide", "region"]
SplitBy = Literal["slide", "tile"]
Coords = Literal["qupath", "level0"]
PaintOrder = Literal["document", "area"]


def _shapely() -> Any:
    try:
        import shapely
    except ImportError as e:
        raise InputError(
            "QuPath GeoJSON needs shapely from the 'slides' extra: pip install \"ldiffusion[slides]\""
        ) from e
    return shapely


# ---------------------------------------------------------------------- reading GeoJSON


@dataclasses.dataclass(frozen=True)
class QuPathFeature:
    """One polygonal QuPath object.

    Attributes:
        index: position of the feature in its file (0-based).
        name: `properties.name` (None when absent).
        id: the feature's `id` (QuPath 0.4+: a UUID; None when absent).
        class_name: classification name ("Unclassified" when the feature has none).
        color: classification colour (r, g, b), or None.
        object_type: "annotation", "detection", "cell", ...
        geometry: a valid shapely Polygon or MultiPolygon (coordinates as in the file); after a
            repair, possibly a GeometryCollection that also holds the zero-width parts (lines,
            points) that `make_valid` split off.
        repaired: True when the file's geometry was invalid and repaired with `make_valid`.
    """

    index: int
    name: str | None
    id: str | None
    class_name: str
    color: tuple[int, int, int] | None
    object_type: str
    geometry: Any
    repaired: bool = False

    def describe(self) -> str:
        """Return "feature 3 (name 'x', id 'y', class 'z')" for messages."""
        parts = [f"name {self.name!r}"] if self.name else []
        if self.id:
            parts.append(f"id {self.id!r}")
        parts.append(f"class {self.class_name!r}")
        return f"feature {self.index} ({', '.join(parts)})"


def parse_color(value: Any, where: str) -> tuple[int, int, int] | None:
    """Parse a QuPath colour: `[r, g, b]` (optionally with alpha) or a packed (A)RGB int; None stays None.

    Example:
        >>> parse_color(-16711936, "x"), parse_color([255, 0, 0], "x")
        ((0, 255, 0), (255, 0, 0))
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise InputError(f"{where}: colour {value!r} is not valid; expected [r, g, b] or a packed RGB int")
    if isinstance(value, int):
        v = value & 0xFFFFFF
        return (v >> 16 & 255, v >> 8 & 255, v & 255)
    if isinstance(value, (list, tuple)) and len(value) in (3, 4):
        try:
            rgb = tuple(int(c) for c in value[:3])
        except (TypeError, ValueError, OverflowError):
            rgb = ()
        if len(rgb) == 3 and all(0 <= c <= 255 for c in rgb):
            return rgb  # type: ignore[return-value]
    raise InputError(
        f"{where}: colour {value!r} is not valid; expected [r, g, b] in 0..255 or a packed RGB int"
    )


def _classification(props: dict[str, Any], where: str) -> tuple[str, tuple[int, int, int] | None]:
    cls = props.get("classification")
    if cls is None:
        return UNCLASSIFIED, None
    if isinstance(cls, str):
        return cls, None
    if isinstance(cls, dict):
        name = cls.get("name")
        if name is None and isinstance(cls.get("names"), list):
            name = ": ".join(str(n) for n in cls["names"])
        if name is None:
            return UNCLASSIFIED, parse_color(cls.get("color", cls.get("colorRGB")), where)
        return str(name), parse_color(cls.get("color", cls.get("colorRGB")), where)
    raise InputError(
        f"{where}: properties.classification={cls!r} is not valid; expected "
        '{"name": ..., "color": [r, g, b]} or a class name'
    )


def _object_type(feat: dict[str, Any], props: dict[str, Any]) -> str:
    t = props.get("objectType")
    if isinstance(t, str):
        return t.lower()
    legacy = _LEGACY_TYPES.get(str(feat.get("id", "")))
    return legacy or "annotation"


def _polygonal(geom: Any) -> Any:
    """Return the polygonal parts of `geom` as a Polygon/MultiPolygon, or None when it has none."""
    shapely = _shapely()
    parts = [g for g in shapely.get_parts(geom) if g.geom_type in ("Polygon", "MultiPolygon")]
    polys = [p for g in parts for p in shapely.get_parts(g) if not p.is_empty]
    if not polys:
        return None
    return polys[0] if len(polys) == 1 else shapely.MultiPolygon(polys)


def _repair(poly: Any) -> Any:
    """`shapely.make_valid`, keeping the polygonal parts and the zero-width parts it splits off.

    Returns a Polygon / MultiPolygon, or a GeometryCollection of those and the collapsed lines and
    points (a spike "A -> B -> A" of the outline becomes a line); None when nothing polygonal is left.
    """
    shapely = _shapely()
    fixed = shapely.make_valid(poly)
    polygonal = _polygonal(fixed)
    if polygonal is None:
        return None
    flat = [p for g in shapely.get_parts(fixed) for p in shapely.get_parts(g)]
    collapsed = [p for p in flat if p.geom_type in ("LineString", "LinearRing", "Point") and not p.is_empty]
    if not collapsed:
        return polygonal
    return shapely.GeometryCollection([*shapely.get_parts(polygonal), *collapsed])


def _feature_list(data: Any, path: Path) -> list[Any]:
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        if data.get("type") == "FeatureCollection":
            feats = data.get("features")
            if not isinstance(feats, list):
                raise InputError(f"{path}: FeatureCollection without a 'features' list")
            return feats
        if data.get("type") == "Feature":
            return [data]
    raise InputError(
        f"{path}: not QuPath GeoJSON; expected a FeatureCollection, a Feature or an array of "
        f"features, got {type(data).__name__} with type={getattr(data, 'get', dict().get)('type')!r}"
    )


class _WarnOnce:
    """Log the first `MAX_WARNINGS` warnings of a file, then one summary line."""

    def __init__(self, path: Path) -> None:
        self.path, self.n = path, 0

    def __call__(self, msg: str) -> None:
        self.n += 1
        if self.n <= MAX_WARNINGS:
            logger.warning("%s: %s", self.path, msg)

    def close(self, what: str) -> None:
        if self.n > MAX_WARNINGS:
            logger.warning("%s: %d more %s not shown", self.path, self.n - MAX_WARNINGS, what)


def read_geojson(
    path: str | Path, *, object_types: Sequence[str] = DEFAULT_OBJECT_TYPES, repair: bool = True
) -> list[QuPathFeature]:
    """Read the polygonal objects of a QuPath GeoJSON export.

    Args:
        path: `.geojson` / `.json` file.
        object_types: object types kept (others, e.g. "tile", are skipped silently).
        repair: repair invalid geometries with `shapely.make_valid` (default); False keeps them
            as they are, so they are filled by the even-odd rule of their rings (as the MoNuSeg
            converter fills its XML polygons). Either way each one is logged as a warning.

    Returns:
        The features with a non-empty polygonal geometry, in file order; invalid geometries are
        repaired (logged as a warning naming each feature).

    Raises:
        InputError: unreadable JSON, not GeoJSON, or a feature with a malformed geometry / colour.
    """
    shapely = _shapely()
    from shapely.geometry import shape

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad UTF-8 or JSON
        raise InputError(f"{path}: cannot read GeoJSON ({type(e).__name__}: {str(e)[:200]})") from e
    feats = _feature_list(data, path)
    types = {t.lower() for t in object_types}
    out: list[QuPathFeature] = []
    repaired = _WarnOnce(path)
    skipped: dict[str, int] = {}
    for i, feat in enumerate(feats):
        if not isinstance(feat, dict) or feat.get("type", "Feature") != "Feature":
            raise InputError(f"{path}: feature {i} is not a GeoJSON Feature object")
        props = feat.get("properties") or {}
        where = f"{path}: feature {i}"
        if not isinstance(props, dict):
            raise InputError(f"{where}: properties={str(props)[:60]!r} is not valid; expected an object")
        otype = _object_type(feat, props)
        if otype not in types:
            continue
        cname, color = _classification(props, where)
        name = props.get("name")
        fid = (
            feat.get("id")
            if isinstance(feat.get("id"), str) and feat.get("id") not in _LEGACY_TYPES
            else None
        )
        gj = feat.get("geometry")
        if gj is None:
            skipped["without geometry"] = skipped.get("without geometry", 0) + 1
            continue
        try:
            geom = shape(gj)
        except Exception as e:  # shapely raises several types for malformed coordinates
            raise InputError(f"{where}: malformed geometry {str(gj)[:80]!r} ({e})") from e
        if not np.isfinite(shapely.get_coordinates(geom)).all():
            raise InputError(f"{where}: geometry {str(gj)[:80]!r} has a NaN or infinite coordinate")
        info = QuPathFeature(i, str(name) if name is not None else None, fid, cname, color, otype, None)
        poly = _polygonal(geom)
        if poly is None:
            kind = geom.geom_type
            skipped[kind] = skipped.get(kind, 0) + 1
            continue
        fixed = False
        if not poly.is_valid:
            reason = shapely.is_valid_reason(poly)
            if not repair:
                repaired(f"{info.describe()} has invalid geometry ({reason}); kept as is (no repair)")
            else:
                poly = _repair(poly)
                fixed = True
                repaired(
                    f"{info.describe()} has invalid geometry ({reason}); repaired with shapely.make_valid"
                    + ("" if poly is not None else " (nothing polygonal left; skipped)")
                )
                if poly is None:
                    continue
        out.append(dataclasses.replace(info, geometry=poly, repaired=fixed))
    repaired.close("invalid features")
    for kind, n in skipped.items():
        logger.warning(
            "%s: skipped %d feature(s) %s (only polygons can be rasterised)",
            path,
            n,
            kind if kind.startswith("without") else f"of type {kind}",
        )
    return out


# ---------------------------------------------------------------------- classes


def read_class_file(path: str | Path) -> list[ClassInfo]:
    """Read a class table: `[{id, name, color}]`, `{"classes": [...]}` (e.g. a dataset.json) or `{name: id}`.

    Ids must be 0..K-1; a `{name: id}` mapping without id 0 gets "background" at 0. Missing
    colours are filled later from the GeoJSON (or a default palette).

    Raises:
        ConfigError: missing or unreadable file, bad entries or ids (the message names the file and key).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--classes {path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad UTF-8 or JSON
        raise ConfigError(f"{path}: cannot read class table ({type(e).__name__}: {str(e)[:200]})") from e
    if isinstance(data, dict) and "classes" in data:
        data = data["classes"]
    entries: list[tuple[int, str, Any]] = []
    if isinstance(data, dict):
        for name, cid in data.items():
            if isinstance(cid, bool) or not isinstance(cid, int):
                raise ConfigError(f"{path}: key {name!r} maps to {cid!r}; expected an integer class id")
            entries.append((cid, str(name), None))
        if 0 not in {e[0] for e in entries}:
            entries.append((0, "background", (0, 0, 0)))
    elif isinstance(data, list):
        for k, c in enumerate(data):
            if not isinstance(c, dict) or "name" not in c or "id" not in c:
                raise ConfigError(
                    f'{path}: entry {k} is {c!r}; expected {{"id": int, "name": str, "color": [r, g, b]}}'
                )
            if isinstance(c["id"], bool) or not isinstance(c["id"], int):
                raise ConfigError(f"{path}: entry {k} has id {c['id']!r}; expected an integer class id")
            entries.append((c["id"], str(c["name"]), c.get("color")))
    else:
        raise ConfigError(f"{path}: expected a list of {{id, name, color}} or a {{name: id}} mapping")
    entries.sort(key=lambda e: e[0])
    ids = [e[0] for e in entries]
    if ids != list(range(len(ids))):
        raise ConfigError(f"{path}: class ids must be 0..K-1 without gaps or repeats, got {ids}")
    names = [e[1] for e in entries]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{path}: class names {dup} appear more than once")
    out = []
    for cid, name, col in entries:
        rgb = parse_color(col, f"{path}: class {name!r}") if col is not None else None
        out.append(ClassInfo(cid, name, rgb if rgb is not None else (-1, -1, -1)))
    return out


def build_classes(
    found: dict[str, tuple[int, int, int] | None],
    *,
    class_file: str | Path | None = None,
    region_classes: Sequence[str] = DEFAULT_REGION_CLASSES,
    ignore_classes: Sequence[str] = DEFAULT_IGNORE_CLASSES,
    sources: str = "",
) -> tuple[tuple[ClassInfo, ...], dict[str, int]]:
    """Return the class table and the name -> value map used for painting.

    Args:
        found: class names found in the annotations -> their first colour (None when absent).
        class_file: optional class table (`read_class_file`).
        region_classes: names that mark the annotated area (painted 0).
        ignore_classes: names painted 255.
        sources: description of the annotation files, for error messages.

    Returns:
        `(classes, values)`: `values[name]` is the class id, 0 for region classes and 255 for ignore
        classes; names absent from `values` are not painted ("Unclassified" without a rule).

    Raises:
        ConfigError: with `class_file`, a name found that is not in it (lists the names found).
    """
    special = [*region_classes, *ignore_classes]
    both = sorted(set(region_classes) & set(ignore_classes))
    if both:
        raise ConfigError(f"class name(s) {both} are both region and ignore classes; choose one")
    values: dict[str, int] = {n: 0 for n in region_classes}
    values.update({n: 255 for n in ignore_classes})
    if class_file is not None:
        table = read_class_file(class_file)
        names = [c.name for c in table]
        clash = sorted(set(names) & set(special))
        if clash:
            raise ConfigError(
                f"{class_file}: class(es) {clash} are also region/ignore classes "
                f"(--region-class {list(region_classes)}, --ignore-class {list(ignore_classes)}); "
                "remove them from one of the two"
            )
        unknown = sorted(n for n in found if n not in names and n not in special and n != UNCLASSIFIED)
        if unknown:
            hint = suggest(unknown[0], names)
            raise ConfigError(
                f"{class_file}: class name(s) {unknown} found in the annotations{sources} are not in "
                f"the class table {names}{hint}; names found: {sorted(found)}. Add them to "
                f"{class_file}, or declare them with --region-class / --ignore-class"
            )
        classes = tuple(
            c
            if c.color != (-1, -1, -1)
            else ClassInfo(c.id, c.name, found.get(c.name) or _palette_color(c.id))
            for c in table
        )
    else:
        bg = next((n for n in sorted(found) if n.lower() == "background" and n not in special), None)
        names = sorted(n for n in found if n not in special and n != UNCLASSIFIED and n != bg)
        classes = (
            ClassInfo(0, bg or "background", (found.get(bg) if bg else None) or (0, 0, 0)),
            *(ClassInfo(k, n, found[n] or _palette_color(k)) for k, n in enumerate(names, start=1)),
        )
        if len(classes) > 255:
            raise ConfigError(
                f"{len(classes)} classes found{sources}; labels are uint8, so at most 255 "
                "(ids 0..254) are possible"
            )
    values.update({c.name: c.id for c in classes})
    return classes, values


_PALETTE = (
    (0, 0, 0),
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
)


def _palette_color(k: int) -> tuple[int, int, int]:
    return _PALETTE[k % len(_PALETTE)]


# ---------------------------------------------------------------------- rasterisation


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


# ---------------------------------------------------------------------- tiles


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


# ---------------------------------------------------------------------- preparing a data set


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


def _safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "slide"


def _paint_items(
    features: Sequence[QuPathFeature],
    values: dict[str, int],
    *,
    region_classes: Sequence[str],
    ignore_classes: Sequence[str],
    paint_order: PaintOrder,
    where: Path,
) -> tuple[list[PaintItem], list[Any]]:
    """Return the paint list (regions, annotations, detections/cells, ignore) and the region geometries."""
    regions, annotations, detections, ignores = [], [], [], []
    skipped = 0
    for f in features:
        if f.class_name not in values:
            skipped += 1
            continue
        if f.class_name in region_classes:
            regions.append(PaintItem(f.geometry, 0))
        elif f.class_name in ignore_classes:
            ignores.append(PaintItem(f.geometry, 255))
        elif f.object_type == "annotation":
            annotations.append(PaintItem(f.geometry, values[f.class_name], instance=True))
        else:
            detections.append(PaintItem(f.geometry, values[f.class_name], instance=True))
    if skipped:
        logger.warning(
            "%s: skipped %d feature(s) without a class rule (%r); declare %r with --region-class, "
            "--ignore-class or in --classes to use them",
            where,
            skipped,
            UNCLASSIFIED,
            UNCLASSIFIED,
        )
    if paint_order == "area":  # larger first, so nested smaller objects stay visible (stable sort)
        annotations.sort(key=lambda it: -it.geometry.area)
        detections.sort(key=lambda it: -it.geometry.area)
    elif paint_order != "document":
        raise ConfigError(f"paint_order={paint_order!r} is not valid; choose 'document' or 'area'")
    return [*regions, *annotations, *detections, *ignores], [it.geometry for it in regions]


@staged(NAME)  # a failed preparation leaves OUT untouched; takes force=
def prepare_qupath(
    annotations: str | Path,
    out: str | Path,
    *,
    slides: Sequence[str | Path],
    open_slide: Callable[..., SlideSource],
    classes: str | Path | None = None,
    mpp: float | None = None,
    slide_mpp: float | None = None,
    tile_px: int = 512,
    grid: Grid = "slide",
    split_by: SplitBy = "slide",
    val_fraction: float | int = 0.15,
    test_fraction: float | int = 0.15,
    seed: int = 0,
    region_classes: Sequence[str] = DEFAULT_REGION_CLASSES,
    ignore_classes: Sequence[str] = DEFAULT_IGNORE_CLASSES,
    object_types: Sequence[str] = DEFAULT_OBJECT_TYPES,
    instances: bool = False,
    pixel_centre: float = 0.5,
    coords: Coords = "qupath",
    paint_order: PaintOrder = "document",
    repair: bool = True,
    name: str | None = None,
    progress: bool = True,
) -> DatasetInfo:
    """Rasterise QuPath GeoJSON annotations on slide tiles into a data set folder `out`.

    Args:
        annotations: folder of GeoJSON exports (or one file), matched to slides by file stem.
        out: output folder (empty, new, or a previous preparation to replace).
        slides: slide files and/or folders of slides.
        open_slide: `open_slide(path, mpp=...) -> SlideSource`, e.g. `ldiffusion.infer.slide.open_slide`.
        classes: class table JSON (see `read_class_file`); None = from the names found.
        mpp: resolution of the tiles (µm/px); None = each slide's level 0.
        slide_mpp: level-0 mpp of every slide, overriding the metadata (needed with `mpp` when the
            metadata lacks it).
        tile_px: tile side in pixels at `mpp`.
        grid: "slide" (one grid from the slide's origin) or "region" (one grid per region feature).
        split_by: "slide" (a slide's tiles stay in one split) or "tile".
        val_fraction, test_fraction: share of tiles for validation / test (float, whole groups taken;
            an int is a number of groups); 0 = none.
        seed: seed of the split.
        region_classes: classes that mark the annotated area (background 0 inside).
        ignore_classes: classes painted 255 (not annotated).
        object_types: QuPath object types read.
        instances: also write `instances/<id>.png` (every class feature is one object); task "instance".
        pixel_centre: sample point of a pixel in the GeoJSON frame, 0.5 (QuPath) or 0 (Aperio XML).
        coords: "qupath" (level 0 minus the slide bounds offset) or "level0".
        paint_order: "document" (file order; later wins) or "area" (larger first).
        repair: repair invalid geometry with `shapely.make_valid` (see `read_geojson`).
        name: data set name (default: the output folder name).
        progress: show a progress bar on stderr.

    Returns:
        The written `DatasetInfo` (also in `out/dataset.json`; `manifest.json` is written last).

    Raises:
        InputError: missing files, unreadable slides or GeoJSON, an unknown mpp, or no labelled tile.
        ConfigError: bad options, or (with `classes`) a class name not in the table.
    """
    options = manifest_options(locals())  # first: the call's arguments only
    from ldiffusion.data.converters._common import finish, prepare_out
    from ldiffusion.data.splits import make_splits

    shapely = _shapely()
    if pixel_centre not in (0, 0.0, 0.5):
        raise ConfigError(
            f"pixel_centre={pixel_centre!r} is not valid; choose 0.5 (QuPath) or 0 (Aperio XML)"
        )
    if coords not in ("qupath", "level0"):
        raise ConfigError(f"coords={coords!r} is not valid; choose 'qupath' or 'level0'")
    if split_by not in ("slide", "tile"):
        raise ConfigError(f"split_by={split_by!r} is not valid; choose 'slide' or 'tile'")
    if grid not in ("slide", "region"):
        raise ConfigError(f"grid={grid!r} is not valid; choose 'slide' or 'region'")
    if tile_px < 16:
        raise ConfigError(f"tile={tile_px} should be >= 16 px")
    if mpp is not None and not mpp > 0:
        raise ConfigError(f"mpp={mpp} should be > 0 (microns per pixel of the tiles)")
    pairs = match_annotations(find_slides(slides), find_annotations(annotations))
    per_slide = [
        (stem, sp, ap, read_geojson(ap, object_types=object_types, repair=repair)) for stem, sp, ap in pairs
    ]
    found: dict[str, tuple[int, int, int] | None] = {}
    for _, _, _, feats in per_slide:
        for f in feats:
            if found.get(f.class_name) is None:
                found[f.class_name] = f.color
    class_table, values = build_classes(
        found,
        class_file=classes,
        region_classes=region_classes,
        ignore_classes=ignore_classes,
        sources=f" ({len(per_slide)} files in {annotations})",
    )
    if grid == "region" and not any(f.class_name in region_classes for *_, fs in per_slide for f in fs):
        raise InputError(
            f"grid='region' needs region features (classes {list(region_classes)}) but none was "
            f"found in {annotations}; use grid 'slide' or declare the region class"
        )
    # checks that need the slides, before anything is written
    downsamples: dict[str, float] = {}
    slide_mpps: dict[str, float | None] = {}
    for stem, slide_path, _, _ in per_slide:
        reader = open_slide(slide_path, mpp=slide_mpp)
        try:
            downsamples[stem] = _downsample(reader, mpp, slide_path)
            slide_mpps[stem] = reader.mpp
        finally:
            reader.close()
    if split_by == "slide":
        _split(list(downsamples), None, val_fraction, test_fraction, seed, "slides")
    writer = prepare_out(out)
    try:
        ids, groups = [], {}
        for stem, slide_path, ann_path, feats in per_slide:
            items, region_geoms = _paint_items(
                feats,
                values,
                region_classes=region_classes,
                ignore_classes=ignore_classes,
                paint_order=paint_order,
                where=ann_path,
            )
            reader = open_slide(slide_path, mpp=slide_mpp)
            try:
                tids = _write_tiles(
                    writer,
                    reader,
                    stem,
                    items,
                    region_geoms,
                    downsample=downsamples[stem],
                    tile_px=tile_px,
                    grid=grid,
                    pixel_centre=pixel_centre,
                    coords=coords,
                    instances=instances,
                    progress=progress,
                )
            finally:
                reader.close()
            ids += tids
            groups.update(dict.fromkeys(tids, stem))
        if not ids:
            raise InputError(
                f"no tile of {[p[0] for p in pairs]} has an annotated pixel; check the class rules "
                "(--region-class, --classes) and the coordinate frame (--coords)"
            )
        kind = "slides" if split_by == "slide" else "tiles"
        train, val, test = _split(
            ids, groups if split_by == "slide" else None, val_fraction, test_fraction, seed, kind
        )
    except BaseException:
        for sub in ("images", "labels", "instances"):  # our own partial outputs: a rerun starts clean
            shutil.rmtree(writer.root / sub, ignore_errors=True)
        raise
    n_repaired = sum(f.repaired for *_, fs in per_slide for f in fs)
    info = DatasetInfo(
        name=name or Path(out).name,
        task="instance" if instances else "semantic",
        classes=class_table,
        splits=make_splits(train, val, test),
        mpp=mpp if mpp is not None else _common_mpp(slide_mpps),
        groups=groups,
        source=f"QuPath GeoJSON annotations of {len(per_slide)} slide(s), rasterised by ldiffusion "
        f"(pixel_centre {pixel_centre}, coords {coords})",
    )
    return finish(
        writer,
        info,
        converter=NAME,
        version=VERSION,
        src=Path(annotations),
        options=options,
        extra={
            "slides": {s: str(p) for s, p, _ in pairs},
            "repaired_features": n_repaired,
            "class_values": values,
        },
    )


def _split(
    ids: list[str], groups: dict[str, str] | None, val: float | int, test: float | int, seed: int, kind: str
) -> tuple[list[str], list[str], list[str]]:
    from ldiffusion.data.splits import split_train_val_test

    try:
        return split_train_val_test(ids, groups, val=val, test=test, seed=seed)
    except ConfigError as e:
        n = len(set(groups.values())) if groups is not None else len(ids)
        raise ConfigError(
            f"{e} ({n} {kind}); lower --val-fraction / --test-fraction (0 = no such split) or use "
            "--split-by tile"
        ) from e


def _write_tiles(
    writer: Any,
    reader: SlideSource,
    stem: str,
    items: list[PaintItem],
    region_geoms: list[Any],
    *,
    downsample: float,
    tile_px: int,
    grid: Grid,
    pixel_centre: float,
    coords: Coords,
    instances: bool,
    progress: bool,
) -> list[str]:
    """Rasterise and write the labelled tiles of one slide; return their ids."""
    from ldiffusion.data.converters._common import progress_bar

    shapely = _shapely()
    d = downsample
    fx, fy = reader.bounds_offset if coords == "qupath" else (0, 0)
    w0, h0 = reader.dimensions
    regions0 = [
        (b[0] + fx, b[1] + fy, b[2] + fx, b[3] + fy)
        for g in region_geoms
        for b in (p.bounds for p in shapely.get_parts(g))
    ]
    origins = tile_origins(w0, h0, tile_px, d, grid=grid, regions=regions0, pixel_centre=pixel_centre)
    tree = shapely.STRtree([it.geometry for it in items])
    span = tile_px * d
    ids = []
    with progress_bar(origins, desc=f"qupath {stem}", progress=progress) as bar:
        for x0, y0 in bar:
            ox, oy = x0 - fx, y0 - fy  # tile origin in the GeoJSON frame
            hits = sorted(
                int(i) for i in tree.query(shapely.box(ox - 1, oy - 1, ox + span + 1, oy + span + 1))
            )
            if not hits:
                continue
            label, inst = rasterise(
                [items[i] for i in hits],
                (tile_px, tile_px),
                origin=(ox, oy),
                downsample=d,
                pixel_centre=pixel_centre,
                with_instances=instances,
            )
            if (label == 255).all():
                continue
            image = reader.read_scaled(int(x0), int(y0), tile_px, tile_px, d)
            tid = f"{_safe_id(stem)}_x{x0}_y{y0}"
            writer.add(tid, np.ascontiguousarray(image), label, inst)
            ids.append(tid)
    logger.info(
        "%s: %d labelled tiles of %d px at downsample %.4g (%d features)",
        stem,
        len(ids),
        tile_px,
        d,
        len(items),
    )
    return ids


def manifest_options(values: dict[str, Any]) -> dict[str, Any]:
    """Return the options of a `prepare_qupath` call as recorded in `manifest.json` (JSON-normalised).

    `values` maps keyword names to values (e.g. the call's `locals()`); the output folder, the
    annotation source, the slide opener and `progress` are not options.
    """
    skip = {"out", "progress", "open_slide", "annotations"}
    opts = {k: v for k, v in values.items() if k not in skip}
    return json.loads(json.dumps(opts, default=str))


def _downsample(reader: SlideSource, mpp: float | None, path: Path) -> float:
    if mpp is None:
        return 1.0
    if reader.mpp is None:
        raise InputError(f"{path}: the slide metadata has no mpp, needed for --mpp {mpp}; pass --slide-mpp")
    d = float(mpp) / float(reader.mpp)
    if abs(d - 1.0) < 1e-3:
        return 1.0
    if d < 1.0:
        raise InputError(
            f"{path}: --mpp {mpp} is finer than the slide's level 0 ({reader.mpp} µm/px); "
            "upsampling is not supported"
        )
    return d


def _common_mpp(mpps: dict[str, float | None]) -> float | None:
    vals = set(mpps.values())
    if len(vals) == 1:
        return next(iter(vals))
    logger.warning(
        "slides have different mpp %s and no --mpp was given; dataset.json gets mpp null "
        "(pass --mpp to tile all slides at one resolution)",
        sorted(mpps.items())[:5],
    )
    return None


# ---------------------------------------------------------------------- Aperio XML -> GeoJSON


def _xml_stem(path: Path) -> str:
    name = path.name
    for suf in (".xml.gz", ".xml"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return path.stem


def find_xml(src: str | Path) -> list[Path]:
    """Return the Aperio XML files (`.xml`, `.xml.gz`) of a file or folder, sorted by name."""
    src = Path(src)
    if src.is_dir():
        files = sorted(
            p for p in src.iterdir() if p.is_file() and p.name.lower().endswith((".xml", ".xml.gz"))
        )
    elif src.is_file():
        files = [src]
    else:
        raise InputError(f"{src}: not found; give an Aperio XML file or a folder of them")
    if not files:
        raise InputError(f"{src}: no .xml or .xml.gz files found")
    return files


def qupath_feature(
    rings: Sequence[np.ndarray],
    *,
    class_name: str,
    color: Sequence[int],
    object_type: str = "annotation",
    feature_id: str | None = None,
    properties: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Return a QuPath GeoJSON Feature of one polygon (exterior ring, then holes; rings closed here)."""
    coords = []
    for ring in rings:
        r = np.asarray(ring, dtype=np.float64)
        if len(r) and not np.array_equal(r[0], r[-1]):
            r = np.vstack([r, r[:1]])
        coords.append([[_num(x), _num(y)] for x, y in r.tolist()])
    feat: dict[str, Any] = {"type": "Feature"}
    if feature_id is not None:
        feat["id"] = feature_id
    feat["geometry"] = {"type": "Polygon", "coordinates": coords}
    feat["properties"] = {
        "objectType": object_type,
        "classification": {"name": class_name, "color": [int(c) for c in color]},
        "isLocked": False,
        **(properties or {}),
    }
    return feat


def _num(v: float) -> float | int:
    return int(v) if float(v).is_integer() and abs(v) < 2**53 else v


def write_feature_collection(path: str | Path, features: Sequence[dict[str, Any]]) -> None:
    """Write a GeoJSON FeatureCollection atomically (one feature per line, exact float repr)."""
    with atomic_write(path, "w") as f:
        f.write('{"type": "FeatureCollection", "features": [')
        for i, feat in enumerate(features):
            f.write(("\n" if i == 0 else ",\n") + json.dumps(feat, separators=(",", ":")))
        f.write("\n]}\n")


def aperio_features(
    path: str | Path,
    *,
    offset: tuple[float, float] = (0.0, 0.0),
    scale: float = 1.0,
    half_pixel: bool = True,
    class_name: str = "Nucleus",
    color: Sequence[int] = (255, 0, 0),
    object_type: str = "annotation",
    image_size: tuple[int, int] | None = None,
    region_class: str | None = None,
    region_color: Sequence[int] = REGION_COLOR,
) -> tuple[list[dict[str, Any]], int]:
    """Convert one Aperio XML file into QuPath features (and optionally a region rectangle).

    A vertex (x, y) becomes `offset + scale * (x + h, y + h)` with h = 0.5 when `half_pixel` (Aperio
    XML as the MoNuSeg converter reads it puts pixel centres at integers, QuPath at +0.5), else 0.

    Args:
        path: `.xml` / `.xml.gz` file.
        offset: slide position (level-0 px) of the image's top-left corner.
        scale: slide pixels per image pixel.
        half_pixel: shift by half a pixel into QuPath's frame (see above).
        class_name, color, object_type: classification and object type of every region.
        image_size: (w, h) of the image; with `region_class`, a rectangle of that class covering
            exactly the image's pixels is added first (it marks the image as fully annotated).
        region_class: class of the region rectangle (None = no rectangle).
        region_color: its colour.

    Returns:
        `(features, number of regions skipped because they have fewer than 3 vertices)`.
    """
    from ldiffusion.data.converters.monuseg import parse_aperio_xml

    path = Path(path)
    stem = _xml_stem(path)
    h = 0.5 if half_pixel else 0.0
    off = np.asarray(offset, dtype=np.float64)
    feats: list[dict[str, Any]] = []
    if region_class is not None and image_size is not None:
        w, ht = image_size
        # the image's pixels 0..w-1 have their centres at x + h in QuPath's frame: corners at h - 0.5
        c = np.array([[0, 0], [w, 0], [w, ht], [0, ht]], dtype=np.float64) + (h - 0.5)
        feats.append(
            qupath_feature(
                [off + scale * c],
                class_name=region_class,
                color=region_color,
                feature_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"ldiffusion:{stem}:region")),
                properties={"name": f"{stem} region", "metadata": {"source_image": stem}},
            )
        )
    skipped = 0
    for k, poly in enumerate(parse_aperio_xml(path)):
        if len(poly) < 3:
            skipped += 1
            continue
        xy = off + scale * (poly + h) if scale != 1.0 else off + (poly + h)
        feats.append(
            qupath_feature(
                [xy],
                class_name=class_name,
                color=color,
                object_type=object_type,
                feature_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"ldiffusion:{stem}:{k}")),
                properties={"metadata": {"source_image": stem, "region_index": str(k + 1)}},
            )
        )
    return feats, skipped


def read_placement(path: str | Path) -> dict[str, dict[str, int]]:
    """Read a placement JSON: `{"images": {stem: {x, y, w, h}}}` or `{stem: {x, y, w, h}}` (level-0 px).

    `benchmarks/make_monuseg_slide.py` writes the first form.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"--placement {path}: cannot read ({e})") from e
    images = data.get("images", data) if isinstance(data, dict) else None
    if not isinstance(images, dict):
        raise InputError(f'{path}: expected {{"images": {{stem: {{x, y, w, h}}}}}}')
    for stem, p in images.items():
        if not isinstance(p, dict) or not {"x", "y"} <= set(p):
            raise InputError(f"{path}: entry {stem!r} is {p!r}; expected {{x, y, w, h}} in level-0 px")
    return images


def export_aperio_xml(
    src: str | Path,
    out: str | Path,
    *,
    placement: str | Path | None = None,
    offset: tuple[float, float] = (0.0, 0.0),
    scale: float = 1.0,
    half_pixel: bool = True,
    class_name: str = "Nucleus",
    color: Sequence[int] = (255, 0, 0),
    object_type: str = "annotation",
    image_size: tuple[int, int] | None = None,
    region: bool | None = None,
    region_class: str = DEFAULT_REGION_CLASSES[0],
) -> dict[str, int]:
    """Convert Aperio XML (a file or a folder of them) into QuPath GeoJSON.

    Args:
        src: `.xml` / `.xml.gz` file or folder.
        out: a `.geojson` / `.json` file (all XML merged into one FeatureCollection, e.g. for a
            stitched slide) or a folder (one `<stem>.geojson` per XML).
        placement: JSON of where each image lies on the slide (`read_placement`); its (x, y) is
            added to `offset` and its (w, h) gives the region rectangle.
        offset, scale, half_pixel, class_name, color, object_type: see `aperio_features`.
        image_size: (w, h) of every image when there is no placement (for the region rectangle).
        region: add a rectangle of `region_class` over each image (marks it as fully annotated,
            so pixels outside the objects become background): None = when the size is known.
        region_class: class of the rectangles (QuPath's "Region*" by default).

    Returns:
        Number of features written per output file name.

    Raises:
        InputError: missing files, a stem missing from the placement, several XML merged into one
            file without a placement, or `region=True` without a known size.
    """
    files = find_xml(src)
    out = Path(out)
    single = out.suffix.lower() in ANNOTATION_SUFFIXES
    places = read_placement(placement) if placement is not None else None
    if places is not None:
        missing = [_xml_stem(f) for f in files if _xml_stem(f) not in places]
        if missing:
            raise InputError(
                f"--placement {placement}: no entry for {missing[:5]}; entries: {sorted(places)[:5]}"
            )
    elif single and len(files) > 1:
        raise InputError(
            f"{len(files)} XML files would all land at one offset in {out}; give --placement or "
            "an output folder"
        )
    counts: dict[str, int] = {}
    merged: list[dict[str, Any]] = []
    n_skipped = 0
    for f in files:
        stem = _xml_stem(f)
        ox, oy = float(offset[0]), float(offset[1])
        size = image_size
        if places is not None:
            p = places[stem]
            ox, oy = ox + float(p["x"]), oy + float(p["y"])
            if "w" in p and "h" in p:
                size = (int(p["w"]), int(p["h"]))
        if region and size is None:
            raise InputError(
                f"{f}: region rectangles need the image size; give --image-size W H or a placement "
                "with w and h"
            )
        feats, skipped = aperio_features(
            f,
            offset=(ox, oy),
            scale=scale,
            half_pixel=half_pixel,
            class_name=class_name,
            color=color,
            object_type=object_type,
            image_size=size,
            region_class=region_class if region is not False else None,
        )
        n_skipped += skipped
        if single:
            merged.extend(feats)
        else:
            path = out / f"{stem}.geojson"
            write_feature_collection(path, feats)
            counts[path.name] = len(feats)
    if single:
        write_feature_collection(out, merged)
        counts[out.name] = len(merged)
    if n_skipped:
        logger.info("skipped %d region(s) with fewer than 3 vertices", n_skipped)
    logger.info("wrote %d features to %s", sum(counts.values()), out)
    return counts


__all__ = [
    "PaintItem",
    "QuPathFeature",
    "SlideSource",
    "aperio_features",
    "build_classes",
    "export_aperio_xml",
    "find_annotations",
    "find_slides",
    "manifest_options",
    "match_annotations",
    "parse_color",
    "polygon_pixels",
    "prepare_qupath",
    "rasterise",
    "read_class_file",
    "read_geojson",
    "read_placement",
    "ring_to_pixels",
    "tile_origins",
    "write_feature_collection",
]
