"""Aperio ImageScope XML (MoNuSeg) -> QuPath GeoJSON, placed on a stitched slide if wanted."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ldiffusion.core.errors import InputError
from ldiffusion.data.qupath.geojson import (
    DEFAULT_REGION_CLASSES,
    REGION_COLOR,
    qupath_feature,
    write_feature_collection,
)
from ldiffusion.data.qupath.tiles import ANNOTATION_SUFFIXES

logger = logging.getLogger(__name__)

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
