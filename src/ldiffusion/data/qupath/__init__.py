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

**Modules.** `geojson` (reading features and classifications, class tables, writing features and
collections, shared with `slide predict` through `ldiffusion.infer.writers`), `raster` (polygons to
pixels), `tiles` (tile grids, finding slides and annotation files), `prepare` (`prepare_qupath`) and
`aperio` (`export_aperio_xml`). Every public name is importable from `ldiffusion.data.qupath`.

Example:
    >>> from ldiffusion.infer.slide import open_slide                            # doctest: +SKIP
    >>> info = prepare_qupath("exports/", "data/qupath", slides=["slides/"],       # doctest: +SKIP
    ...                       open_slide=open_slide, mpp=0.5, tile_px=512)
"""

from __future__ import annotations

from ldiffusion.data.qupath.aperio import (
    aperio_features,
    export_aperio_xml,
    find_xml,
    read_placement,
)
from ldiffusion.data.qupath.geojson import (
    DEFAULT_IGNORE_CLASSES,
    DEFAULT_OBJECT_TYPES,
    DEFAULT_REGION_CLASSES,
    IGNORE_COLOR,
    MAX_WARNINGS,
    REGION_COLOR,
    SNAP_DECIMALS,
    UNCLASSIFIED,
    Coords,
    QuPathFeature,
    build_classes,
    palette_color,
    parse_color,
    polygon_feature,
    polygon_feature_dict,
    qupath_feature,
    read_class_file,
    read_geojson,
    write_feature_collection,
)
from ldiffusion.data.qupath.prepare import (
    NAME,
    VERSION,
    PaintOrder,
    SplitBy,
    manifest_options,
    prepare_qupath,
)
from ldiffusion.data.qupath.raster import (
    PaintItem,
    polygon_pixels,
    rasterise,
    ring_to_pixels,
)
from ldiffusion.data.qupath.tiles import (
    ANNOTATION_SUFFIXES,
    SLIDE_SUFFIXES,
    Grid,
    SlideSource,
    find_annotations,
    find_slides,
    match_annotations,
    slide_stem,
    tile_origins,
)

__all__ = [
    "ANNOTATION_SUFFIXES",
    "DEFAULT_IGNORE_CLASSES",
    "DEFAULT_OBJECT_TYPES",
    "DEFAULT_REGION_CLASSES",
    "IGNORE_COLOR",
    "MAX_WARNINGS",
    "NAME",
    "REGION_COLOR",
    "SLIDE_SUFFIXES",
    "SNAP_DECIMALS",
    "UNCLASSIFIED",
    "VERSION",
    "Coords",
    "Grid",
    "PaintItem",
    "PaintOrder",
    "QuPathFeature",
    "SlideSource",
    "SplitBy",
    "aperio_features",
    "build_classes",
    "export_aperio_xml",
    "find_annotations",
    "find_slides",
    "find_xml",
    "manifest_options",
    "match_annotations",
    "palette_color",
    "parse_color",
    "polygon_feature",
    "polygon_feature_dict",
    "polygon_pixels",
    "prepare_qupath",
    "qupath_feature",
    "rasterise",
    "read_class_file",
    "read_geojson",
    "read_placement",
    "ring_to_pixels",
    "slide_stem",
    "tile_origins",
    "write_feature_collection",
]
