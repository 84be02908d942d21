"""`ldiffusion slide ...`: whole-slide commands (`predict`; room for `suggest`)."""

from __future__ import annotations

from pathlib import Path

import typer

from ldiffusion.cli._common import DEVICE, SEED
from ldiffusion.core.errors import InputError

app = typer.Typer(
    name="slide",
    help="Whole-slide images: tiled prediction to OME-TIFF, GeoJSON, stats.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command("predict")
def predict(
    run: Path = typer.Argument(..., help="Run folder (config.json + model.safetensors)."),
    slides: list[Path] = typer.Argument(None, help="Slide files (SVS, TIFF, or any OpenSlide format)."),
    out: Path = typer.Option(..., "--out", help="Output root; each slide goes to OUT/<slide id>/."),
    mpp: float = typer.Option(None, "--mpp", help="Microns per level-0 pixel (overrides/supplies metadata)."),
    target_mpp: float = typer.Option(
        None, "--target-mpp", help="Predict at this resolution (default: level 0)."
    ),
    tile: int = typer.Option(512, "--tile", help="Tile side in px."),
    overlap: int = typer.Option(64, "--overlap", help="Overlap between tiles in px."),
    batch_size: int = typer.Option(8, "--batch-size", help="Tiles per forward pass."),
    formats: str = typer.Option(
        "ome-tiff,geojson,png",
        "--formats",
        help="Comma-separated outputs: ome-tiff, geojson, png (stats.json always).",
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue interrupted slides from their finished tiles."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Predict slides again even when finished."),
    tissue: bool = typer.Option(
        True, "--tissue/--no-tissue", help="Skip background tiles (tissue detection)."
    ),
    coords: str = typer.Option(
        "qupath", "--coords", help="GeoJSON frame: qupath (minus slide bounds offset) or level0."
    ),
    manifest: Path = typer.Option(None, "--manifest", help="CSV with a 'path' column (optional 'mpp')."),
    shard: str = typer.Option(
        None, "--shard", help="i/N: predict every N-th slide from the i-th (job arrays)."
    ),
    scheduler: str = typer.Option(None, "--scheduler", help="Dask scheduler tcp://host:port (extra 'dask')."),
    device: str = DEVICE,
    seed: int = SEED,
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bars."),
) -> None:
    """Predict whole slides into OUT/<id>/ (labels.ome.tif, annotations.geojson, overlay.png, stats.json)."""
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

    jobs = [SlideJob(str(p), mpp) for p in slides or []]
    if manifest is not None:
        jobs += [SlideJob(j.path, j.mpp if j.mpp is not None else mpp) for j in read_manifest(manifest)]
    if not jobs:
        raise InputError("no slides given: pass slide files and/or --manifest slides.csv")
    jobs = shard_jobs(jobs, parse_shard(shard))
    kwargs = dict(
        tile_px=tile,
        overlap_px=overlap,
        batch_size=batch_size,
        formats=parse_formats(formats),
        resume=resume,
        overwrite=overwrite,
        tissue=tissue,
        coords=coords,
        seed=seed,
        target_mpp=target_mpp,
    )
    if scheduler:
        results = predict_slides_dask(scheduler, RunLoader(str(run), device), jobs, out, **kwargs)
    else:
        from ldiffusion.core.device import resolve_device
        from ldiffusion.methods import load_segmenter

        segmenter = load_segmenter(run, resolve_device(device))
        results = run_slides(segmenter, jobs, out, progress=not no_progress, **kwargs)  # type: ignore[arg-type]
    done = sum(not r.skipped for r in results)
    print(f"{done} slides predicted, {len(results) - done} already finished; outputs in {out}")


def register(root: typer.Typer) -> None:
    """Add the `slide` command group to `root`."""
    root.add_typer(app, name="slide")
