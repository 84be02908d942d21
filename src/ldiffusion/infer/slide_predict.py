"""Whole-slide prediction: tissue tiles -> any segmenter -> blended label pyramid + GeoJSON + stats.

`predict_slide` streams one slide through a `TileSegmenter` (anything with `num_classes` and
`predict_proba(images (B, 3, H, W) float32 in [0, 1], *, generator=None) -> (B, K, H, W)`), so every
method works through the same interface and tests use trivial fake models. Memory does not grow
with the slide size (see `ldiffusion.infer.merge`); an interrupted run resumes from its finished
batches and produces byte-identical outputs; finished slides are skipped.

Outputs, in `out_dir/<slide id>/`:

- `labels.ome.tif`: uint8 class map, tiled (256), zlib, pyramidal (SubIFDs mirroring the slide's
  levels), OME PhysicalSizeX/Y = working mpp;
- `annotations.geojson`: QuPath FeatureCollection, one polygon per object, level-0 coordinates
  (minus the slide bounds offset with `coords="qupath"`), classification name + colour;
- `stats.json`: per-class pixel counts and areas (mm^2 when the mpp is known);
- `overlay.png`: low-resolution overlay for a quick look;
- `done.json`: written last; its presence marks the slide as finished.

Scale out with `run_manifest(..., shard=(i, n))` (job arrays) or `predict_slides_dask` (a Dask
cluster; the model is loaded once per worker).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import json
import logging
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from ldiffusion.core.errors import CheckpointError, InputError, LDiffusionError
from ldiffusion.core.io import read_json, write_json
from ldiffusion.core.registry import suggest
from ldiffusion.core.rng import derive_seed, make_generator
from ldiffusion.data.stain_norm import LabStats, lab_stats, reinhard
from ldiffusion.data.targets import redraw_markers
from ldiffusion.infer.merge import TileMerger, build_pyramid, pyramid_ratios
from ldiffusion.infer.outputs import DEFAULT_MAX_BYTES, check_bytes, module_fingerprint, output_path
from ldiffusion.infer.slide import SlideReader, open_slide
from ldiffusion.infer.tiling import tile_grid
from ldiffusion.infer.tissue import detect_tissue, select_tiles
from ldiffusion.infer.writers import (
    area_stats,
    class_counts,
    default_palette,
    nearest_resize,
    ome_uuid,
    pick_level,
    write_geojson,
    write_ome_tiff,
    write_overlay_png,
    write_stats,
)
from ldiffusion.methods.sliding import scaled_predict_proba

logger = logging.getLogger(__name__)

FORMATS = ("ome-tiff", "geojson", "png", "uncertainty")
DEFAULT_FORMATS = ("ome-tiff", "geojson", "png")
OUTPUT_NAMES = {"ome-tiff": "labels.ome.tif", "geojson": "annotations.geojson", "png": "overlay.png",
                "uncertainty": "uncertainty.ome.tif"}
DONE_NAME = "done.json"
#: memory per tile of the tile list (Tile objects, resume state, tissue selection), an upper estimate
TILE_BOOKKEEPING_BYTES = 1024
STATS_NAME = "stats.json"
#: longer side (px) of the thumbnail that gives a slide's colour statistics (--stain-normalize)
STAIN_THUMB_PX = 1024


@runtime_checkable
class TileSegmenter(Protocol):
    """What slide prediction needs from a model: `num_classes` and batched class probabilities."""

    num_classes: int

    def predict_proba(
        self, images: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Return (B, K, H, W) probabilities for images (B, 3, H, W) float32 in [0, 1]."""
        ...


def parse_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
    """Parse "ome-tiff,geojson,png" (or a sequence) into a validated tuple in canonical order."""
    items = [f.strip().lower() for f in (formats.split(",") if isinstance(formats, str) else formats)]
    items = [f for f in items if f]
    aliases = {
        "ome": "ome-tiff",
        "ometiff": "ome-tiff",
        "tiff": "ome-tiff",
        "tif": "ome-tiff",
        "json": "geojson",
    }
    out = []
    for f in items:
        f = aliases.get(f, f)
        if f not in FORMATS:
            raise InputError(
                f"format {f!r} is not valid; choose from {list(FORMATS)}{suggest(f, list(FORMATS))}"
            )
        out.append(f)
    return tuple(f for f in FORMATS if f in out)


def slide_id(path: str | Path) -> str:
    """Return the output name of a slide: its file name without the (double) suffix."""
    name = Path(path).name
    for suf in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return Path(name).stem


def _segmenter_info(segmenter: TileSegmenter) -> tuple[list[str], np.ndarray, str]:
    k = int(segmenter.num_classes)
    names = list(getattr(segmenter, "class_names", None) or [f"class{i}" for i in range(k)])
    extra = getattr(segmenter, "extra_info", None) or {}
    pal = getattr(segmenter, "palette", None)
    if pal is None:
        pal = extra.get("palette")
    palette = np.asarray(pal, dtype=np.uint8) if pal is not None else default_palette(k)
    if palette.shape != (k, 3):
        palette = default_palette(k)
    if len(names) != k:
        names = [f"class{i}" for i in range(k)]
    ident = str(getattr(segmenter, "name", "") or type(segmenter).__name__)
    return names, palette, ident


def _device(segmenter: TileSegmenter) -> torch.device:
    dev = getattr(segmenter, "device", None)
    return dev if isinstance(dev, torch.device) else torch.device("cpu")


@dataclasses.dataclass(frozen=True)
class SlideResult:
    """What `predict_slide` produced for one slide."""

    slide: str
    id: str
    out_dir: str
    outputs: dict[str, str]
    skipped: bool
    n_tiles: int
    stats: dict[str, Any]


def predict_slide(
    segmenter: TileSegmenter,
    slide: str | Path | SlideReader,
    out_dir: str | Path,
    *,
    mpp: float | None = None,
    tile_px: int = 512,
    overlap_px: int = 64,
    batch_size: int = 8,
    formats: str | Sequence[str] = DEFAULT_FORMATS,
    resume: bool = False,
    progress: bool = True,
    target_mpp: float | None = None,
    tissue: bool = True,
    seed: int = 0,
    overwrite: bool = False,
    coords: str = "qupath",
    chunk_px: int = 512,
    overlay_px: int = 2048,
    name: str | None = None,
    model_fingerprint: str | None = None,
    max_bytes: float | None = DEFAULT_MAX_BYTES,
    stain_target: LabStats | None = None,
) -> SlideResult:
    """Predict one slide into `out_dir/<slide id>/`.

    Args:
        segmenter: any `TileSegmenter` (e.g. `ldiffusion.methods.load_segmenter(run)`).
        slide: slide file, or an open `SlideReader` (e.g. `ArraySlide`).
        out_dir: output root; the slide's files go to `out_dir/<id>/`.
        mpp: microns per level-0 pixel, overriding the slide metadata.
        tile_px: tile side in working pixels (rounded up to the segmenter's `size_divisor`).
        overlap_px: overlap between neighbouring tiles, in [0, tile_px).
        batch_size: tiles per forward pass (fixed batches make resumed runs identical).
        formats: any of "ome-tiff", "geojson", "png" and "uncertainty" (stats.json is always written).
            "uncertainty" writes `uncertainty.ome.tif`, a pyramidal uint8 map (255 = 1) of the
            normalised entropy of the blended probabilities, with the layout of `labels.ome.tif`.
        resume: continue an interrupted run from its finished batches (else start again).
        progress: show a tqdm bar on stderr.
        target_mpp: predict at this resolution (needs the mpp); None = level 0.
        tissue: skip tiles without tissue (Otsu on saturation of a thumbnail); False = predict all.
        seed: seed of stochastic methods (each batch gets `derive_seed(seed, id, batch)`).
        overwrite: redo a slide whose `done.json` exists.
        coords: GeoJSON frame: "qupath" (level 0 minus the slide bounds offset) or "level0".
        chunk_px: label-map chunk (finalisation block) side.
        overlay_px: longer side of the PNG overlay.
        name: slide id (default: from the file name).
        model_fingerprint: identity of the weights and config (e.g. `outputs.run_fingerprint(run)`),
            stored in the resume state and `done.json`; default: a hash of the segmenter's state
            dict (class name only for objects without one). A resume with another model is refused.
        max_bytes: memory limit of one allocation (a tile read, a decoded TIFF strip, a thumbnail
            strip, the tile list); a slide or `target_mpp` that would need more is refused with the
            figure before anything is allocated (None = no limit).
        stain_target: colour statistics to map the slide onto (`data.stain_norm.reference_stats`;
            None = off). The slide's own statistics come from a thumbnail (`STAIN_THUMB_PX` on its
            longer side), so every tile gets the same Reinhard transform; both are in `done.json`.

    A slide without resolution metadata (and no `mpp`) is predicted with a warning naming the
    file (areas in pixels, no `target_mpp`). Existing files in `out_dir/<id>/` that this command
    did not write (no `done.json` nor resume state there) are refused unless `overwrite`.

    Returns:
        A `SlideResult`; `skipped=True` when the slide was already finished.

    Raises:
        InputError: bad arguments, unreadable slide, or a model returning the wrong shape.
        CheckpointError: `resume` with parameters that differ from the interrupted run.
    """
    fmts = parse_formats(formats)
    if batch_size < 1:
        raise InputError(f"batch_size={batch_size} should be >= 1")
    if coords not in ("qupath", "level0"):
        raise InputError(f"coords={coords!r} is not valid; choose 'qupath' or 'level0'")
    if target_mpp is not None and not target_mpp > 0:
        raise InputError(f"target_mpp={target_mpp} should be > 0 (microns per working pixel)")
    out_root = Path(out_dir)
    if out_root.exists() and not out_root.is_dir():
        raise InputError(
            f"--out {out_root}: exists and is not a folder; give a folder (each slide goes to OUT/<id>/)"
        )
    own_reader = not isinstance(slide, SlideReader)
    reader = open_slide(slide, mpp=mpp, max_bytes=max_bytes) if own_reader else slide  # type: ignore[arg-type]
    try:
        if not own_reader and mpp is not None:
            reader.mpp = mpp
        return _predict_slide(
            segmenter,
            reader,
            out_root,
            fmts=fmts,
            tile_px=tile_px,
            overlap_px=overlap_px,
            batch_size=batch_size,
            resume=resume,
            progress=progress,
            target_mpp=target_mpp,
            tissue=tissue,
            seed=seed,
            overwrite=overwrite,
            coords=coords,
            chunk_px=chunk_px,
            overlay_px=overlay_px,
            name=name or slide_id(reader.path),
            model_fingerprint=model_fingerprint,
            max_bytes=max_bytes,
            stain_target=stain_target,
        )
    finally:
        if own_reader:
            reader.close()


def _predict_slide(
    segmenter: TileSegmenter,
    reader: SlideReader,
    out_root: Path,
    *,
    fmts: tuple[str, ...],
    tile_px: int,
    overlap_px: int,
    batch_size: int,
    resume: bool,
    progress: bool,
    target_mpp: float | None,
    tissue: bool,
    seed: int,
    overwrite: bool,
    coords: str,
    chunk_px: int,
    overlay_px: int,
    name: str,
    model_fingerprint: str | None,
    max_bytes: float | None,
    stain_target: LabStats | None = None,
) -> SlideResult:
    k = int(segmenter.num_classes)
    names, palette, ident = _segmenter_info(segmenter)
    div = max(int(getattr(segmenter, "size_divisor", 1) or 1), 1)
    tile = -(-int(tile_px) // div) * div
    if not 0 <= overlap_px < tile:
        raise InputError(f"overlap_px={overlap_px} is out of range; expected [0, tile_px={tile})")
    if reader.mpp is None and target_mpp is None:
        logger.warning(
            "%s: no resolution metadata (mpp unknown): predicting at level 0, areas in stats.json in "
            "pixels; pass --mpp to set it",
            reader.path,
        )
    if reader.mpp is None and target_mpp is not None:
        raise InputError(
            f"{reader.path}: target_mpp={target_mpp} needs the slide's mpp, which its metadata "
            "lacks; pass --mpp"
        )
    scale = float(target_mpp / reader.mpp) if (target_mpp is not None and reader.mpp) else 1.0
    if abs(scale - 1.0) < 1e-3:
        scale = 1.0
    if scale < 1.0:
        raise InputError(
            f"target_mpp={target_mpp} is finer than the slide's level 0 ({reader.mpp} µm/px); "
            "upsampling is not supported"
        )
    W0, H0 = reader.dimensions
    if reader.bounds_size is not None:
        (ox, oy), (bw, bh) = reader.bounds_offset, reader.bounds_size
    else:
        ox, oy, bw, bh = 0, 0, W0, H0
    width, height = max(1, math.ceil(bw / scale)), max(1, math.ceil(bh / scale))
    _check_memory(reader, tile, overlap_px, scale, width, height, overlay_px, target_mpp, max_bytes)
    label_mpp = reader.mpp * scale if reader.mpp else None
    fingerprint = model_fingerprint or module_fingerprint(segmenter)
    params = {
        "slide": name,
        "model": ident,
        "tile_px": tile,
        "overlap_px": int(overlap_px),
        "scale": scale,
        "batch_size": int(batch_size),
        "chunk_px": int(chunk_px),
        "origin": [int(ox), int(oy)],
        "mpp": reader.mpp,
        "tissue": bool(tissue),
        "seed": int(seed),
        "formats": list(fmts),
        "coords": coords,
    }
    if fingerprint is not None:
        params["model_fingerprint"] = fingerprint
    stain_source = None
    if stain_target is not None:
        stain_source = _slide_stain_stats(reader, ox, oy, bw, bh)
        params["stain_normalize"] = {"target": stain_target.to_json(), "source": stain_source.to_json()}
    post = contour_postprocess(getattr(segmenter, "cfg", None))
    if post is not None:
        params["contour"] = post
    out = output_path(out_root, name)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder; slide {name!r} writes its outputs there")
    done_path = out / DONE_NAME
    _check_ownership(out, overwrite)
    if resume:
        _check_resume_model(out / ".work" / "state.json", name, fingerprint)
    if done_path.is_file() and not overwrite:
        done = read_json(done_path)
        if done.get("params") == params:
            logger.info("%s: already finished (%s), skipping", name, done_path)
            return SlideResult(
                str(reader.path),
                name,
                str(out),
                done.get("outputs", {}),
                True,
                int(done.get("n_tiles", 0)),
                done.get("stats", {}),
            )
        raise InputError(
            f"{done_path}: slide {name!r} was finished with other parameters; pass --overwrite "
            "to predict it again"
        )
    if done_path.exists():
        done_path.unlink()

    all_tiles = tile_grid(width, height, tile, overlap_px)
    mask = detect_tissue(reader) if tissue else None
    tiles = select_tiles(all_tiles, mask, scale=scale, origin=(ox, oy))
    logger.info(
        "%s: %d x %d px at %.3g level-0 px/px, %d of %d tiles with tissue",
        name,
        width,
        height,
        scale,
        len(tiles),
        len(all_tiles),
    )
    work = out / ".work"
    labels_fn, margin_px = None, 0  # the arg-max, unless a contour model re-draws its markers
    if post is not None and (post["marker_threshold"] is not None or post["marker_erosion_px"] > 0):
        labels_fn = functools.partial(redraw_markers, marker_threshold=post["marker_threshold"],
                                      marker_erosion_px=post["marker_erosion_px"])
        margin_px = post["marker_erosion_px"]
    merger = TileMerger(
        work, width, height, k, tiles, batch_size, params=params, resume=resume, chunk_px=chunk_px,
        uncertainty="uncertainty" in fmts, labels_fn=labels_fn, margin_px=margin_px,
    )
    device = _device(segmenter)
    pending = merger.pending_batches()
    bar = _progress(len(merger.batches), merger.batches_done, name, progress)
    try:
        for b in pending:
            batch = merger.batch_tiles(b)
            imgs = np.stack(
                [
                    reader.read_scaled(round(ox + t.x * scale), round(oy + t.y * scale), t.w, t.h, scale)
                    for t in batch
                ]
            )
            if stain_target is not None and stain_source is not None:
                imgs = np.stack([reinhard(img, stain_source, stain_target) for img in imgs])
            x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div_(255.0).to(device)
            gen = make_generator(derive_seed(seed, name, b), device)
            with torch.no_grad():
                probs = scaled_predict_proba(segmenter, x, generator=gen)  # input_scale: resized in and out
            if tuple(probs.shape) != (len(batch), k, tile, tile):
                raise InputError(
                    f"model returned probabilities of shape {tuple(probs.shape)}; expected "
                    f"{(len(batch), k, tile, tile)} (B, K, H, W)"
                )
            merger.add_batch(b, probs.detach().float().cpu().numpy())
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if not merger.done:  # no tile at all (no tissue): finalise the empty map
        merger.finish()

    ratios = pyramid_ratios(reader.level_downsamples if scale == 1.0 else (1.0,), width, height)
    levels = build_pyramid(merger.labels, work, ratios, chunk_px=chunk_px)
    outputs: dict[str, str] = {}
    out.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    if "ome-tiff" in fmts:
        p = out / OUTPUT_NAMES["ome-tiff"]
        write_ome_tiff(p, levels, mpp=label_mpp, uuid=ome_uuid(name, digest), name=name)
        outputs["ome-tiff"] = p.name
    if "uncertainty" in fmts:
        p = out / OUTPUT_NAMES["uncertainty"]
        u_levels = build_pyramid(merger.uncertainty, work, ratios, chunk_px=chunk_px, prefix="uncertainty")
        write_ome_tiff(p, u_levels, mpp=label_mpp, uuid=ome_uuid(name, digest, "uncertainty"), name=name)
        outputs["uncertainty"] = p.name
    if "geojson" in fmts:
        p = out / OUTPUT_NAMES["geojson"]
        bx, by = reader.bounds_offset
        offset = (float(ox - bx), float(oy - by)) if coords == "qupath" else (float(ox), float(oy))
        if post is not None:  # one polygon per object: the markers, grown back over the band they lost
            write_geojson(p, levels[0], names, palette, scale=scale, offset=offset,
                          skip=(0, len(names) - 1), grow_px=post["boundary_px"] + post["marker_erosion_px"],
                          min_area_px=post["min_object_px"])
        else:
            write_geojson(p, levels[0], names, palette, scale=scale, offset=offset)
        outputs["geojson"] = p.name
    if "png" in fmts:
        p = out / OUTPUT_NAMES["png"]
        s = max(width / overlay_px, height / overlay_px, 1.0)
        tw, th = max(1, round(width / s)), max(1, round(height / s))
        image = reader.read_scaled_strips(int(ox), int(oy), tw, th, s * scale)
        small = nearest_resize(np.asarray(pick_level(levels, overlay_px)[:, :]), tw, th)
        write_overlay_png(p, image, small, palette)
        outputs["png"] = p.name
    stats = area_stats(class_counts(levels[0], k), names, label_mpp=label_mpp, level0_px_per_label_px=scale)
    stats.update({"slide": name, "tiles_predicted": len(tiles), "tiles_total": len(all_tiles)})
    write_stats(out / STATS_NAME, stats)
    outputs["stats"] = STATS_NAME
    write_json(
        done_path,
        {
            "slide": str(reader.path),
            "id": name,
            "params": params,
            "outputs": outputs,
            "n_tiles": len(tiles),
            "stats": STATS_NAME,
        },
    )
    shutil.rmtree(work, ignore_errors=True)
    logger.info("%s: wrote %s", name, ", ".join(sorted(outputs.values())))
    return SlideResult(str(reader.path), name, str(out), outputs, False, len(tiles), stats)


def _slide_stain_stats(reader: SlideReader, ox: int, oy: int, bw: int, bh: int) -> LabStats:
    """L*a*b* statistics of the slide's stained pixels, from a thumbnail of its bounds."""
    s = max(bw / STAIN_THUMB_PX, bh / STAIN_THUMB_PX, 1.0)
    tw, th = max(1, round(bw / s)), max(1, round(bh / s))
    return lab_stats([reader.read_scaled_strips(int(ox), int(oy), tw, th, s)], where=str(reader.path))


def contour_postprocess(cfg: Any) -> dict[str, Any] | None:
    """The post-processing keys of a contour model's config (None for a semantic model).

    The same keys `predict` applies (`infer.predict.contour_instances`): `marker_threshold`,
    `marker_erosion_px`, `min_object_px`, with `boundary_px` (how far the polygons grow back).
    """
    if getattr(cfg, "target", "semantic") != "contour":
        return None
    return {
        "boundary_px": int(cfg.boundary_px),
        "marker_threshold": None if cfg.marker_threshold is None else float(cfg.marker_threshold),
        "marker_erosion_px": int(cfg.marker_erosion_px),
        "min_object_px": int(cfg.min_object_px),
    }


def _check_memory(
    reader: SlideReader,
    tile: int,
    overlap_px: int,
    scale: float,
    width: int,
    height: int,
    overlay_px: int,
    target_mpp: float | None,
    max_bytes: float | None,
) -> None:
    """Refuse (InputError with the figure) a run whose reads or tile list would exceed `max_bytes`."""
    if max_bytes is None:
        return
    at = f" at target_mpp={target_mpp}" if target_mpp is not None else ""
    level = reader.best_level_for_downsample(scale)
    side = math.ceil(tile * scale / reader.level_downsamples[level])
    check_bytes(
        side * side * 3,
        f"{reader.path}: reading one {tile}-px tile{at} ({side} x {side} px of level {level})",
        max_bytes,
        "choose a finer --target-mpp, a smaller --tile, or a slide with a pyramid",
    )
    stride = tile - overlap_px
    n_tiles = math.ceil(max(width - overlap_px, 1) / stride) * math.ceil(max(height - overlap_px, 1) / stride)
    check_bytes(
        n_tiles * TILE_BOOKKEEPING_BYTES,
        f"{reader.path}: the list of {n_tiles} tiles ({width} x {height} px, {tile}-px tiles)",
        max_bytes,
        "choose a larger --tile or a coarser --target-mpp",
    )
    s = max(width / overlay_px, height / overlay_px, 1.0) * scale  # overlay strips (256 rows)
    lv = reader.best_level_for_downsample(s)
    lw, lh = reader.level_dimensions[lv]
    rows = min(math.ceil(256 * s / reader.level_downsamples[lv]), lh)
    check_bytes(lw * rows * 3, f"{reader.path}: reading one overlay strip ({lw} x {rows} px of level {lv})",
                max_bytes, "the slide has no coarse pyramid level; use --formats ome-tiff,geojson")


def _check_ownership(out: Path, overwrite: bool) -> None:
    """Refuse to replace files in `out` that no earlier `slide predict` wrote (unless `overwrite`)."""
    if overwrite or not out.is_dir():
        return
    if (out / DONE_NAME).is_file() or (out / ".work" / "state.json").is_file():
        return  # a slide folder this command wrote (finished or interrupted)
    ours = [*OUTPUT_NAMES.values(), STATS_NAME, ".work"]
    foreign = [out / n for n in ours if (out / n).exists() or (out / n).is_symlink()]
    if foreign:
        raise InputError(
            f"{foreign[0]}: exists and was not written by `ldiffusion slide predict` (no {DONE_NAME} nor "
            "resume state beside it); pass --overwrite to replace it, or choose another --out"
        )


def _check_resume_model(state_path: Path, name: str, fingerprint: str | None) -> None:
    """Refuse to resume a slide started with other weights/config than `fingerprint`."""
    if not state_path.is_file():
        return
    try:
        old = (read_json(state_path).get("params") or {}).get("model_fingerprint")
    except (ValueError, AttributeError):
        return  # unreadable state: the merger starts again
    if old != fingerprint:
        raise CheckpointError(
            f"{state_path}: slide {name!r} was started with another model (fingerprint "
            f"{str(old)[:12]}, this run {str(fingerprint)[:12]}); resume with the run that started it, "
            "or rerun without --resume to start again"
        )


def _progress(total: int, initial: int, name: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=name, unit="batch", dynamic_ncols=True, leave=True)


# ---------------------------------------------------------------------- many slides


@dataclasses.dataclass(frozen=True)
class SlideJob:
    """One slide to predict: its path and optional mpp override."""

    path: str
    mpp: float | None = None


def read_manifest(path: str | Path) -> list[SlideJob]:
    """Read a CSV manifest with a `path` column (relative to the CSV's folder) and optional `mpp`.

    Raises:
        InputError: missing file or `path` column, or an invalid mpp value.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: manifest not found")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise InputError(
                f"{path}: manifest needs a 'path' column (optional: 'mpp'), got {reader.fieldnames}"
            )
        jobs = []
        for i, row in enumerate(reader, start=2):
            p = Path(row["path"].strip())
            if not p.is_absolute():
                p = path.parent / p
            raw = (row.get("mpp") or "").strip()
            try:
                m = float(raw) if raw else None
            except ValueError as e:
                raise InputError(f"{path}:{i}: mpp={raw!r} is not a number") from e
            jobs.append(SlideJob(str(p), m))
    return jobs


def parse_shard(text: str | None) -> tuple[int, int]:
    """Parse "i/N" (0 <= i < N) into `(i, N)`; None means "0/1"."""
    if not text:
        return 0, 1
    try:
        i_s, n_s = text.split("/")
        i, n = int(i_s), int(n_s)
    except ValueError as e:
        raise InputError(f"--shard {text!r} should look like i/N, e.g. 0/4") from e
    if n < 1 or not 0 <= i < n:
        raise InputError(f"--shard {text!r}: expected 0 <= i < N")
    return i, n


def shard_jobs(jobs: Sequence[SlideJob], shard: tuple[int, int]) -> list[SlideJob]:
    """Return the jobs of shard `(i, n)`: every n-th job starting at i."""
    i, n = shard
    return list(jobs[i::n])


def run_slides(
    segmenter: TileSegmenter,
    jobs: Sequence[SlideJob],
    out_dir: str | Path,
    *,
    mpp: float | None = None,
    **kwargs: Any,
) -> list[SlideResult]:
    """Predict several slides in turn; a bad slide is logged and the others still run.

    Raises:
        LDiffusionError: after all slides ran, when any of them failed (naming them).
    """
    results, failed = [], []
    for job in jobs:
        try:
            results.append(
                predict_slide(segmenter, job.path, out_dir, mpp=job.mpp if job.mpp else mpp, **kwargs)
            )
        except LDiffusionError as e:
            if len(jobs) == 1:
                raise  # one slide: its own one-line error
            logger.error("%s: %s", job.path, e)
            failed.append(f"{job.path} ({e})")
    if failed:
        raise LDiffusionError(f"{len(failed)} of {len(jobs)} slides failed: " + "; ".join(failed))
    return results


def run_manifest(
    segmenter: TileSegmenter,
    manifest: str | Path,
    out_dir: str | Path,
    *,
    shard: tuple[int, int] = (0, 1),
    **kwargs: Any,
) -> list[SlideResult]:
    """Predict the slides of shard `shard` of a CSV manifest (see `read_manifest`)."""
    return run_slides(segmenter, shard_jobs(read_manifest(manifest), shard), out_dir, **kwargs)


# ---------------------------------------------------------------------- Dask


@dataclasses.dataclass(frozen=True)
class RunLoader:
    """A picklable "load the segmenter of run folder `run` on `device`" callable (for Dask workers).

    `overrides` are inference-time ``key=value`` config changes, as `slide predict --set`."""

    run: str
    device: str = "auto"
    overrides: tuple[str, ...] = ()

    def __call__(self) -> TileSegmenter:
        from ldiffusion.core.device import resolve_device
        from ldiffusion.methods import load_segmenter

        return load_segmenter(self.run, resolve_device(self.device), overrides=list(self.overrides))  # type: ignore[return-value]


def _worker_segmenter(loader: Callable[[], TileSegmenter]) -> TileSegmenter:
    """Return the worker's cached segmenter for `loader` (loaded once per worker)."""
    from distributed import get_worker

    try:
        worker = get_worker()
    except ValueError:  # not on a worker (e.g. a synchronous scheduler)
        return loader()
    cache = worker.__dict__.setdefault("_ldiffusion_segmenters", {})
    key = repr(loader)
    if key not in cache:
        logger.info("worker %s: loading segmenter %s", worker.address, key)
        cache[key] = loader()
    return cache[key]


def _dask_task(
    job: SlideJob, loader: Callable[[], TileSegmenter], out_dir: str, kwargs: dict[str, Any]
) -> SlideResult:
    seg = _worker_segmenter(loader)
    return predict_slide(seg, job.path, out_dir, mpp=job.mpp, progress=False, **kwargs)


def predict_slides_dask(
    scheduler: str | Any,
    loader: Callable[[], TileSegmenter],
    jobs: Sequence[SlideJob],
    out_dir: str | Path,
    **kwargs: Any,
) -> list[SlideResult]:
    """Predict slides on a Dask cluster: one task per slide, the model loaded once per worker.

    Args:
        scheduler: scheduler address ("tcp://host:port") or a `distributed.Client`.
        loader: picklable callable returning the segmenter (e.g. `RunLoader(run_dir, "cuda")`);
            its `repr` keys the per-worker cache.
        jobs: slides to predict.
        out_dir: output root (shared file system).
        kwargs: `predict_slide` options (tile_px, overlap_px, batch_size, formats, resume, ...).

    Raises:
        InputError: the `dask` extra is missing.
        LDiffusionError: any slide failed (after all ran).
    """
    try:
        from distributed import Client
    except ImportError as e:
        raise InputError("--scheduler needs the 'dask' extra: pip install \"ldiffusion[dask]\"") from e
    own = not isinstance(scheduler, Client)
    client = Client(scheduler) if own else scheduler
    try:
        futures = [
            client.submit(
                _dask_task,
                job,
                loader,
                str(out_dir),
                dict(kwargs),
                pure=False,
                key=f"ldiffusion-slide-{i}-{slide_id(job.path)}",
            )
            for i, job in enumerate(jobs)
        ]
        results, failed = [], []
        for job, fut in zip(jobs, futures, strict=True):
            try:
                results.append(fut.result())
            except LDiffusionError as e:
                failed.append(f"{job.path} ({e})")
        if failed:
            raise LDiffusionError(f"{len(failed)} of {len(jobs)} slides failed: " + "; ".join(failed))
        return results
    finally:
        if own:
            client.close()
