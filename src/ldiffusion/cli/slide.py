"""`ldiffusion slide ...`: whole-slide commands (`predict`, `suggest`)."""

from __future__ import annotations

from pathlib import Path

import typer

from ldiffusion.cli._common import DEVICE, SEED
from ldiffusion.core.errors import InputError

app = typer.Typer(
    name="slide",
    help="Whole-slide images: tiled prediction to OME-TIFF, GeoJSON, stats; regions to annotate next.\n\n"
    "Example: ldiffusion slide predict runs/unet-monuseg slides/monuseg_test_slide.tif --out slide_out",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command("predict")
def predict(
    run: Path = typer.Argument(..., help="Run folder (config.json + model.safetensors)."),
    slides: list[Path] = typer.Argument(None, help="Slide files (SVS, TIFF, or any OpenSlide format)."),
    out: Path = typer.Option(..., "--out", help="Output root; each slide goes to OUT/<slide id>/."),
    mpp: float = typer.Option(
        None,
        "--mpp",
        help="Microns per level-0 pixel (overrides/supplies metadata). A slide without resolution "
        "metadata and no --mpp is predicted at level 0 with a warning naming the file (areas in px).",
    ),
    target_mpp: float = typer.Option(
        None, "--target-mpp", help="Predict at this resolution (default: level 0)."
    ),
    tile: int = typer.Option(512, "--tile", help="Tile side in px."),
    overlap: int = typer.Option(64, "--overlap", help="Overlap between tiles in px."),
    batch_size: int = typer.Option(8, "--batch-size", help="Tiles per forward pass."),
    formats: str = typer.Option(
        "ome-tiff,geojson,png",
        "--formats",
        help="Comma-separated outputs: ome-tiff, geojson, png, uncertainty (stats.json always).",
    ),
    uncertainty: bool = typer.Option(
        False,
        "--uncertainty",
        help="Also write uncertainty.ome.tif (normalised entropy of the blended probabilities, "
        "255 = 1, pyramidal like labels.ome.tif; what `ldiffusion view` shows as its uncertainty layer).",
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue interrupted slides from their finished tiles (refused when RUN's weights or "
        "config differ from the run that started the slide).",
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Predict slides again even when finished, and replace files in OUT/<id>/ that "
        "`slide predict` did not write.",
    ),
    max_memory: float = typer.Option(
        8.0,
        "--max-memory",
        help="GiB one allocation may take (a tile read, a decoded TIFF strip, ...); a slide or "
        "--target-mpp needing more is refused before anything is allocated (0 = no limit).",
    ),
    tissue: bool = typer.Option(
        True, "--tissue/--no-tissue", help="Skip background tiles (tissue detection)."
    ),
    stain_normalize: Path = typer.Option(
        None, "--stain-normalize", metavar="REF",
        help="Map the slide's colours onto those of REF before predicting (Reinhard, L*a*b* mean and SD of "
        "stained pixels; the slide's statistics from a thumbnail, one transform for every tile). REF: the "
        "run folder (the training colours stored by `train`), a prepared data set folder (its train split) "
        "or an image file.",
    ),
    coords: str = typer.Option(
        "qupath", "--coords", help="GeoJSON frame: qupath (minus slide bounds offset) or level0."
    ),
    manifest: Path = typer.Option(None, "--manifest", help="CSV with a 'path' column (optional 'mpp')."),
    shard: str = typer.Option(
        None, "--shard", help="i/N: predict every N-th slide from the i-th (job arrays)."
    ),
    scheduler: str = typer.Option(None, "--scheduler", help="Dask scheduler tcp://host:port (extra 'dask')."),
    set_: list[str] = typer.Option(
        None, "--set", help="Inference-time config change key=value (repeatable), as in `predict`: e.g. the "
        "contour post-processing chosen on validation, marker_threshold=0.85 marker_erosion_px=12 "
        "min_object_px=1000 (applied to labels.ome.tif and the GeoJSON polygons as `predict` applies them)."
    ),
    device: str = DEVICE,
    seed: int = SEED,
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bars."),
) -> None:
    """Predict whole slides into OUT/<id>/ (labels.ome.tif, annotations.geojson, overlay.png, stats.json).

    Example: ldiffusion slide predict runs/unet-monuseg slides/monuseg_test_slide.tif --out slide_out
    """
    from ldiffusion.infer.outputs import run_fingerprint
    from ldiffusion.infer.slide_predict import (
        RunLoader,
        SlideJob,
        parse_formats,
        parse_shard,
        predict_slides_dask,
        read_manifest,
        run_slides,
        shard_jobs,
    )

    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder; give a folder (slides go to OUT/<id>/)")
    if max_memory < 0:
        raise InputError(f"--max-memory {max_memory} should be >= 0 (GiB; 0 = no limit)")
    jobs = [SlideJob(str(p), mpp) for p in slides or []]
    if manifest is not None:
        jobs += [SlideJob(j.path, j.mpp if j.mpp is not None else mpp) for j in read_manifest(manifest)]
    if not jobs:
        raise InputError("no slides given: pass slide files and/or --manifest slides.csv")
    jobs = shard_jobs(jobs, parse_shard(shard))
    stain_target = None
    if stain_normalize is not None:
        from ldiffusion.data.stain_norm import reference_stats

        stain_target = reference_stats(stain_normalize)
    kwargs = dict(
        tile_px=tile,
        overlap_px=overlap,
        batch_size=batch_size,
        formats=parse_formats(formats + (",uncertainty" if uncertainty else "")),
        resume=resume,
        overwrite=overwrite,
        tissue=tissue,
        coords=coords,
        seed=seed,
        target_mpp=target_mpp,
        model_fingerprint=run_fingerprint(run, list(set_ or [])),
        max_bytes=max_memory * 1024**3 if max_memory > 0 else None,
        stain_target=stain_target,
    )
    if scheduler:
        loader = RunLoader(str(run), device, tuple(set_ or ()))
        results = predict_slides_dask(scheduler, loader, jobs, out, **kwargs)
    else:
        from ldiffusion.core.device import resolve_device
        from ldiffusion.methods import load_segmenter

        segmenter = load_segmenter(run, resolve_device(device), overrides=list(set_ or []))
        results = run_slides(segmenter, jobs, out, progress=not no_progress, **kwargs)  # type: ignore[arg-type]
    done = sum(not r.skipped for r in results)
    print(f"{done} slides predicted, {len(results) - done} already finished; outputs in {out}")


@app.command("suggest")
def suggest(
    run: Path = typer.Argument(..., help="Run folder (config.json + model.safetensors)."),
    slide: Path = typer.Argument(..., help="Slide file (SVS, TIFF, or any OpenSlide format)."),
    out: Path = typer.Option(..., "--out", help="GeoJSON file to write (QuPath: File > Import objects)."),
    n: int = typer.Option(20, "--n", help="Number of regions to suggest."),
    samples: int = typer.Option(
        1, "--samples", help="Draws per tile: > 1 scores stochastic methods by their sample spread."
    ),
    tile: int = typer.Option(512, "--tile", help="Region (tile) side in px at the working resolution."),
    min_spacing: float = typer.Option(
        None, "--min-spacing", help="Minimum distance between region centres, level-0 px (default: one tile)."
    ),
    mpp: float = typer.Option(None, "--mpp", help="Microns per level-0 pixel (overrides/supplies metadata)."),
    target_mpp: float = typer.Option(
        None, "--target-mpp", help="Score at this resolution (default: level 0; use the training mpp)."
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Tiles per forward pass."),
    min_tissue: float = typer.Option(0.5, "--min-tissue", help="Minimum tissue fraction of a tile."),
    tissue: bool = typer.Option(True, "--tissue/--no-tissue", help="Score tissue tiles only."),
    coords: str = typer.Option(
        "qupath", "--coords", help="GeoJSON frame: qupath (minus slide bounds offset) or level0."
    ),
    class_name: str = typer.Option("To annotate", "--class-name", help="QuPath class of the rectangles."),
    device: str = DEVICE,
    seed: int = SEED,
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bar."),
) -> None:
    """Suggest the N most uncertain tissue regions of SLIDE to annotate next (QuPath GeoJSON rectangles).

    Score = mean per-pixel entropy of the predicted probabilities (normalised by log K), or with
    --samples S > 1 the method's own spread over S draws; the top N are kept greedily with at
    least --min-spacing between their centres.

    Example: ldiffusion slide suggest runs/unet-monuseg slides/monuseg_test_slide.tif --n 20
    --out next.geojson
    """
    from ldiffusion.core.device import resolve_device
    from ldiffusion.infer.suggest import suggest_regions, write_suggestions
    from ldiffusion.methods import load_segmenter

    if coords not in ("qupath", "level0"):
        raise InputError(f"--coords {coords!r} is not valid; choose 'qupath' or 'level0'")
    segmenter = load_segmenter(run, resolve_device(device))
    result = suggest_regions(
        segmenter,  # type: ignore[arg-type]
        slide,
        n=n,
        tile_px=tile,
        min_spacing_px=min_spacing,
        mpp=mpp,
        target_mpp=target_mpp,
        samples=samples,
        batch_size=batch_size,
        seed=seed,
        tissue=tissue,
        min_tissue=min_tissue,
        progress=not no_progress,
    )
    count = write_suggestions(out, result, coords=coords, class_name=class_name)
    top = ", ".join(f"{s.score:.4f}" for s in result.suggestions[:3])
    print(f"suggested {count} regions of {result.n_tiles} tiles scored (top scores {top}) -> {out}")


def register(root: typer.Typer) -> None:
    """Add the `slide` command group to `root`."""
    root.add_typer(app, name="slide")
