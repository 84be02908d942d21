"""`ldiffusion data prepare FORMAT SRC OUT`: convert a public data set into the ldiffusion format.

`ldiffusion data prepare qupath OUT --slides ... --annotations ...` tiles slides annotated in QuPath
(see `ldiffusion.data.qupath`).
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import typer

from ldiffusion.cli._common import PROGRESS, SEED
from ldiffusion.core.config import parse_value
from ldiffusion.core.errors import ConfigError, InputError
from ldiffusion.core.io import read_json
from ldiffusion.data.converters import CONVERTERS, effective_options
from ldiffusion.data.converters._common import same_options, source_fingerprint
from ldiffusion.data.format import DatasetInfo, read_dataset_info

logger = logging.getLogger(__name__)


def parse_options(items: list[str] | None) -> dict[str, object]:
    """Turn `["key=value", ...]` into a dict (values parsed as JSON where they parse)."""
    out: dict[str, object] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--option {item!r} should look like key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = parse_value(value.strip())
    return out


def is_done(out: Path, fmt: str, options: dict[str, object], src: Path) -> bool:
    """True when `out/manifest.json` records the same converter, options and source files."""
    path = out / "manifest.json"
    if not path.is_file() or not (out / "dataset.json").is_file():
        return False
    try:
        man = read_json(path)
    except ValueError:
        return False
    version = getattr(importlib.import_module(CONVERTERS.get(fmt).__module__), "VERSION", None)
    return (isinstance(man, dict) and man.get("converter") == fmt
            and man.get("converter_version") == version
            and isinstance(man.get("options"), dict) and same_options(man["options"], options)
            and man.get("source_fingerprint") == source_fingerprint(src))


def summary(info: DatasetInfo) -> str:
    """Return a short text summary: counts per split (and part) and the class table."""
    lines = [f"{info.name}: task {info.task}, mpp {info.mpp}"]
    lines.append("splits: " + ", ".join(f"{k} {len(v)}" for k, v in info.splits.items()))
    if info.parts:
        lines.append("parts: " + ", ".join(f"{k} {len(v)}" for k, v in info.parts.items()))
    lines.append("classes: " + ", ".join(f"{c.id}={c.name}" for c in info.classes))
    return "\n".join(lines)


QUPATH = "qupath"
_QP = "FORMAT qupath (slides + QuPath GeoJSON)"


def _qp(default: Any, flag: str, text: str) -> Any:
    """A `data prepare` option used by FORMAT qupath only (grouped in --help)."""
    return typer.Option(default, flag, help=text, rich_help_panel=_QP)


def _names(values: list[str] | None, default: tuple[str, ...]) -> tuple[str, ...]:
    """Repeatable class-name option: None = the default, a single "" = none."""
    if values is None:
        return default
    return tuple(v for v in values if v)


def _prepare_qupath(paths: list[Path], *, seed: int, force: bool, progress: bool,
                    qupath: dict[str, Any]) -> None:
    from ldiffusion.data import qupath as qp
    from ldiffusion.data.converters._common import same_options, source_fingerprint
    from ldiffusion.infer.slide import open_slide

    annotations = qupath.pop("annotations")
    if len(paths) == 2 and annotations is None:
        annotations, out = paths
    elif len(paths) == 1:
        out = paths[0]
    else:
        raise ConfigError(f"data prepare qupath expects OUT (with --annotations DIR) or ANNOTATIONS OUT, got "
                          f"{[str(p) for p in paths]}")
    if annotations is None:
        raise ConfigError("data prepare qupath needs --annotations DIR (QuPath GeoJSON exports)")
    if not qupath["slides"]:
        raise ConfigError("data prepare qupath needs --slides (slide files or folders; repeatable)")
    kwargs = {**qupath, "seed": seed}
    options = qp.manifest_options(kwargs)
    man_path = out / "manifest.json"
    if not force and man_path.is_file() and (out / "dataset.json").is_file() and Path(annotations).exists():
        try:
            man = read_json(man_path)
        except ValueError:
            man = {}
        if (isinstance(man, dict) and man.get("converter") == QUPATH
                and man.get("converter_version") == qp.VERSION
                and isinstance(man.get("options"), dict) and same_options(man["options"], options)
                and man.get("source_fingerprint") == source_fingerprint(annotations)):
            print(f"{out}: already prepared by 'qupath' with the same options and annotations; "
                  "skipping (use --force to prepare again)")
            print(summary(read_dataset_info(out)))
            return
    info = qp.prepare_qupath(annotations, out, open_slide=open_slide, progress=progress, force=force,
                             **kwargs)
    print(f"prepared 'qupath' -> {out}")
    print(summary(info))


def register(app: typer.Typer) -> None:
    """Add the `prepare` command to the `data` group `app`."""
    choices = ", ".join([*CONVERTERS.names(), QUPATH])

    @app.command("prepare", help=f"Convert a public data set into the ldiffusion format. FORMAT: {choices}."
                                 "\n\n`prepare FORMAT SRC OUT` for a release folder; `prepare qupath OUT "
                                 "--slides DIR --annotations DIR` for slides annotated in QuPath (GeoJSON)."
                                 "\n\nExample: ldiffusion data prepare monuseg ../shared/data/monuseg "
                                 "data/monuseg")
    def prepare(
        fmt: str = typer.Argument(..., metavar="FORMAT", help=f"Source format, one of: {choices}."),
        paths: list[Path] = typer.Argument(..., metavar="SRC OUT",
                                           help="Folder of the downloaded release, then the output folder "
                                                "(created; a previous conversion by the same FORMAT is "
                                                "replaced once the new one is complete). qupath: OUT (or "
                                                "ANNOTATIONS OUT)."),
        seed: int = SEED,
        option: list[str] = typer.Option(None, "--option", "-o",
                                         help="Converter option key=value (repeatable), e.g. taxonomy=morph.",
                                         ),
        force: bool = typer.Option(False, "--force",
                                   help="Convert again even if OUT is up to date, and replace a data set "
                                        "in OUT written by another command (never a folder that is no "
                                        "data set)."),
        progress: bool = PROGRESS,
        slides: list[Path] = _qp(None, "--slides", "Slide file or folder of slides (repeatable)."),
        annotations: Path = _qp(None, "--annotations",
                                "Folder of QuPath GeoJSON exports (or one file), matched to slides by file "
                                "stem ('a.geojson' or 'a.svs.geojson' -> 'a.svs')."),
        classes: Path = _qp(None, "--classes",
                            "Class table JSON: [{id, name, color}] or {name: id}. Default: background 0, "
                            "then the class names found, sorted."),
        mpp: float = _qp(None, "--mpp", "Resolution of the tiles in µm/px (default: each slide's level 0)."),
        slide_mpp: float = _qp(None, "--slide-mpp",
                               "Level-0 µm/px of every slide (overrides/supplies the metadata)."),
        tile: int = _qp(512, "--tile", "Tile side in pixels at --mpp."),
        grid: str = _qp("slide", "--grid",
                        "slide: one tile grid from the slide's origin; region: one grid per region "
                        "annotation, from its top-left pixel."),
        split_by: str = _qp("slide", "--split-by", "slide (a slide's tiles stay in one split) or tile."),
        val_fraction: float = _qp(0.15, "--val-fraction",
                                  "Share of tiles for validation (whole slides; 0 = none)."),
        test_fraction: float = _qp(0.15, "--test-fraction",
                                   "Share of tiles for test (whole slides; 0 = none)."),
        region_class: list[str] = _qp(None, "--region-class",
                                      "Class marking the annotated area: inside it, pixels of no other class "
                                      "are background 0 (repeatable; default 'Region*'; '' = none)."),
        ignore_class: list[str] = _qp(None, "--ignore-class",
                                      "Class painted 255 = not annotated (repeatable; default 'Ignore*'; "
                                      "'' = none)."),
        object_types: str = _qp("annotation,detection,cell", "--object-types",
                                "QuPath object types read (comma list)."),
        instances: bool = _qp(False, "--instances",
                              "Also write instances/<id>.png (each class object is one instance)."),
        pixel_centre: float = _qp(0.5, "--pixel-centre",
                                  "Where a pixel's centre lies in the GeoJSON frame: 0.5 (QuPath) or 0 "
                                  "(Aperio XML coordinates)."),
        coords: str = _qp("qupath", "--coords", "qupath (level 0 minus the slide bounds offset) or level0."),
        paint_order: str = _qp("document", "--paint-order",
                               "document (later objects win) or area (larger objects first)."),
        repair: bool = _qp(True, "--repair/--no-repair",
                           "Repair invalid geometry with shapely make_valid (warned per feature); "
                           "--no-repair fills the outlines as they are (even-odd rule)."),
        name: str = _qp(None, "--name", "Data set name (default: OUT's name)."),
    ) -> None:
        if fmt == QUPATH:
            if option:
                raise ConfigError("--option is not used by FORMAT qupath; use its own options (see --help)")
            from ldiffusion.data.qupath import DEFAULT_IGNORE_CLASSES, DEFAULT_REGION_CLASSES

            qupath = {
                "annotations": annotations, "slides": list(slides or []), "classes": classes, "mpp": mpp,
                "slide_mpp": slide_mpp, "tile_px": tile, "grid": grid, "split_by": split_by,
                "val_fraction": val_fraction, "test_fraction": test_fraction,
                "region_classes": _names(region_class, DEFAULT_REGION_CLASSES),
                "ignore_classes": _names(ignore_class, DEFAULT_IGNORE_CLASSES),
                "object_types": tuple(t.strip() for t in object_types.split(",") if t.strip()),
                "instances": instances, "pixel_centre": pixel_centre, "coords": coords,
                "paint_order": paint_order, "repair": repair, "name": name,
            }
            _prepare_qupath(paths, seed=seed, force=force, progress=progress, qupath=qupath)
            return
        qupath_only = (("--slides", slides), ("--annotations", annotations), ("--classes", classes))
        given = [flag for flag, v in qupath_only if v]
        if given:
            raise ConfigError(f"{given[0]} is an option of FORMAT qupath, not of {fmt!r}")
        fn = CONVERTERS.get(fmt)
        if len(paths) != 2:
            raise ConfigError(f"data prepare {fmt} expects SRC OUT, got {[str(p) for p in paths]}")
        src, out = paths
        opts = parse_options(option)
        effective = effective_options(fn, seed, **opts)
        if not src.is_dir():
            raise InputError(f"SRC {src}: folder not found; give the folder of the {fmt} release")
        if not force and is_done(out, fmt, effective, src):
            print(f"{out}: already prepared by {fmt!r} with the same options and source; "
                  "skipping (use --force to convert again)")
            print(summary(read_dataset_info(out)))
            return
        info = fn(src, out, seed=seed, progress=progress, force=force, **opts)
        print(f"prepared {fmt!r} -> {out}")
        print(summary(info))
