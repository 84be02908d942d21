"""`ldiffusion data ...`: prepare, check and synthesise data sets; export annotations to QuPath.

Each subcommand lives in its own module (`data_prepare`, `data_check`, `data_synth`, ...) and exposes
`register(app)`; `export-geojson` is defined here.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import typer

from ldiffusion.core.errors import ConfigError

app = typer.Typer(help="Prepare, check and synthesise data sets in the ldiffusion format.\n\n"
                  "Example: ldiffusion data prepare monuseg ../shared/data/monuseg data/monuseg",
                  no_args_is_help=True)

for _name in ("data_prepare", "data_check", "data_synth", "data_export"):
    try:
        importlib.import_module(f"ldiffusion.cli.{_name}").register(app)
    except ModuleNotFoundError as _e:
        if _e.name != f"ldiffusion.cli.{_name}":
            raise


def _rgb(text: str) -> tuple[int, int, int]:
    try:
        rgb = tuple(int(v) for v in text.replace(";", ",").split(","))
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise ConfigError(f"--color {text!r} should be r,g,b with values in 0..255, e.g. 255,0,0")
    return rgb  # type: ignore[return-value]


@app.command("export-geojson")
def export_geojson(
    src: Path = typer.Argument(..., help="Aperio ImageScope XML file (.xml / .xml.gz) or a folder of them."),
    out: Path = typer.Argument(..., help="A .geojson file (all XML merged) or a folder (one <stem>.geojson "
                                         "per XML)."),
    placement: Path = typer.Option(None, "--placement",
                                   help="JSON of where each image lies on a stitched slide: "
                                        "{\"images\": {stem: {x, y, w, h}}} (as benchmarks/"
                                        "make_monuseg_slide.py writes it)."),
    offset: tuple[float, float] = typer.Option((0.0, 0.0), "--offset", metavar="X Y",
                                               help="Slide position (level-0 px) of the image's top-left "
                                                    "corner (added to the placement)."),
    scale: float = typer.Option(1.0, "--scale", help="Slide pixels per image pixel."),
    class_name: str = typer.Option("Nucleus", "--class-name", help="QuPath class of every object."),
    color: str = typer.Option("255,0,0", "--color", help="Class colour r,g,b."),
    object_type: str = typer.Option("annotation", "--object-type",
                                    help="annotation (editable in QuPath) or detection."),
    image_size: tuple[int, int] = typer.Option(None, "--image-size", metavar="W H",
                                               help="Image size for the region rectangle when there is no "
                                                    "placement."),
    region: bool = typer.Option(None, "--region/--no-region",
                                help="Add a rectangle of --region-class over each image, marking it as fully "
                                     "annotated (default: when the image size is known)."),
    region_class: str = typer.Option("Region*", "--region-class", help="Class of the region rectangles."),
    half_pixel: bool = typer.Option(True, "--half-pixel/--no-half-pixel",
                                    help="Add 0.5 px to every XML coordinate: Aperio XML (as the "
                                         "monuseg converter rasterises it) centres pixels on integers, "
                                         "QuPath on +0.5."),
) -> None:
    """Convert MoNuSeg / Aperio XML annotations to QuPath GeoJSON (one Polygon per region).

    With --placement (or --offset / --scale) the objects land at their coordinates on a slide into
    which the images were stitched (e.g. by benchmarks/make_monuseg_slide.py).

    Example: ldiffusion data export-geojson ../shared/data/monuseg/test/Annotations monuseg.geojson
    """
    from ldiffusion.data.qupath import export_aperio_xml

    if object_type not in ("annotation", "detection"):
        raise ConfigError(f"--object-type {object_type!r} is not valid; choose 'annotation' or 'detection'")
    if not scale > 0:
        raise ConfigError(f"--scale {scale} should be > 0")
    counts = export_aperio_xml(
        src, out, placement=placement, offset=(float(offset[0]), float(offset[1])), scale=scale,
        half_pixel=half_pixel, class_name=class_name, color=_rgb(color), object_type=object_type,
        image_size=tuple(image_size) if image_size else None, region=region, region_class=region_class,
    )
    where = out if len(counts) == 1 else f"{len(counts)} files in {out}"
    print(f"wrote {sum(counts.values())} features to {where}")
