"""QuPath GeoJSON: reading features and their classifications, class tables, writing features.

`read_geojson` turns a QuPath export into `QuPathFeature`s (see the package docstring for what is
accepted); `read_class_file` and `build_classes` map class names to ids; `qupath_feature`,
`polygon_feature` and `write_feature_collection` write the GeoJSON that QuPath imports (used by
`export_aperio_xml` here and by `slide predict` through `ldiffusion.infer.writers`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ldiffusion.core.errors import ConfigError, InputError
from ldiffusion.core.io import atomic_write
from ldiffusion.core.registry import suggest
from ldiffusion.data.format import ClassInfo

logger = logging.getLogger(__name__)

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
#: QuPath's colours of its built-in classes
REGION_COLOR = (0, 0, 180)
IGNORE_COLOR = (180, 180, 180)
#: pixel-frame coordinates are rounded to this many decimals before rasterising
SNAP_DECIMALS = 9
#: warnings per file before they are summarised
MAX_WARNINGS = 20

Coords = Literal["qupath", "level0"]


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
            else ClassInfo(c.id, c.name, found.get(c.name) or palette_color(c.id))
            for c in table
        )
    else:
        bg = next((n for n in sorted(found) if n.lower() == "background" and n not in special), None)
        names = sorted(n for n in found if n not in special and n != UNCLASSIFIED and n != bg)
        classes = (
            ClassInfo(0, bg or "background", (found.get(bg) if bg else None) or (0, 0, 0)),
            *(ClassInfo(k, n, found[n] or palette_color(k)) for k, n in enumerate(names, start=1)),
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


def palette_color(k: int) -> tuple[int, int, int]:
    """The colour of class id `k` when none is given (black for 0, then 11 distinct colours, repeating)."""
    return _PALETTE[k % len(_PALETTE)]


def polygon_feature_dict(
    coords: list[list[list[float]]],
    *,
    class_name: str,
    color: Sequence[int],
    object_type: str = "annotation",
    feature_id: str | None = None,
    properties: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Return the QuPath GeoJSON Feature of one polygon given its rings' coordinates (exterior first).

    Every polygon feature this package writes (`export_aperio_xml`, `slide predict`) is built here:
    `{"type", ["id"], "geometry": {"type": "Polygon", ...}, "properties": {"objectType",
    "classification": {"name", "color"}, "isLocked", ...properties}}`.
    """
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


def qupath_feature(
    rings: Sequence[np.ndarray],
    *,
    class_name: str,
    color: Sequence[int],
    object_type: str = "annotation",
    feature_id: str | None = None,
    properties: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Return the GeoJSON Feature of one polygon: rings (N, 2) of x, y, exterior then holes (closed here)."""
    coords = []
    for ring in rings:
        r = np.asarray(ring, dtype=np.float64)
        if len(r) and not np.array_equal(r[0], r[-1]):
            r = np.vstack([r, r[:1]])
        coords.append([[_num(x), _num(y)] for x, y in r.tolist()])
    return polygon_feature_dict(coords, class_name=class_name, color=color, object_type=object_type,
                                feature_id=feature_id, properties=properties)


def _num(v: float) -> float | int:
    return int(v) if float(v).is_integer() and abs(v) < 2**53 else v


def _ring_coords(ring: Any, scale: float, offset: tuple[float, float], as_int: bool) -> list[list[float]]:
    xy = np.asarray(ring.coords, dtype=np.float64) * scale + np.asarray(offset, dtype=np.float64)
    if as_int:
        return np.rint(xy).astype(np.int64).tolist()
    return np.round(xy, 3).tolist()


def polygon_feature(
    poly: Any,
    name: str,
    color: Sequence[int],
    *,
    scale: float = 1.0,
    offset: tuple[float, float] = (0.0, 0.0),
    object_type: str = "annotation",
) -> dict[str, Any]:
    """Return the QuPath GeoJSON Feature of shapely polygon `poly` (pixel xy -> `offset + scale * xy`).

    Coordinates are integers when `scale` and `offset` are, else rounded to 1e-3 px.
    """
    from shapely.geometry.polygon import orient

    poly = orient(poly, sign=1.0)  # RFC 7946: exterior counter-clockwise, holes clockwise
    as_int = float(scale).is_integer() and all(float(o).is_integer() for o in offset)
    coords = [_ring_coords(poly.exterior, scale, offset, as_int)]
    coords += [_ring_coords(r, scale, offset, as_int) for r in poly.interiors]
    return polygon_feature_dict(coords, class_name=name, color=color, object_type=object_type)


def write_feature_collection(path: str | Path, features: Iterable[dict[str, Any]]) -> None:
    """Write a GeoJSON FeatureCollection atomically (one feature per line, exact float repr).

    `features` may be a generator: it is written as it is drawn, so the collection is never held in memory.
    """
    with atomic_write(path, "w") as f:
        f.write('{"type": "FeatureCollection", "features": [')
        for i, feat in enumerate(features):
            f.write(("\n" if i == 0 else ",\n") + json.dumps(feat, separators=(",", ":")))
        f.write("\n]}\n")
