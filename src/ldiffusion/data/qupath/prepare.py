"""`prepare_qupath`: slides + QuPath GeoJSON exports -> a data set in the standard layout."""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ldiffusion.core.errors import ConfigError, InputError
from ldiffusion.data.format import DatasetInfo
from ldiffusion.data.qupath.geojson import (
    DEFAULT_IGNORE_CLASSES,
    DEFAULT_OBJECT_TYPES,
    DEFAULT_REGION_CLASSES,
    UNCLASSIFIED,
    Coords,
    QuPathFeature,
    _shapely,
    build_classes,
    read_geojson,
)
from ldiffusion.data.qupath.raster import PaintItem, rasterise
from ldiffusion.data.qupath.tiles import (
    Grid,
    SlideSource,
    find_annotations,
    find_slides,
    match_annotations,
    tile_origins,
)
from ldiffusion.data.staging import staged

logger = logging.getLogger(__name__)

NAME = "qupath"
VERSION = 1
SplitBy = Literal["slide", "tile"]
PaintOrder = Literal["document", "area"]


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
