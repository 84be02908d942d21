"""Active learning on slides: score tissue tiles by predictive uncertainty, suggest the top N to annotate.

`suggest_regions` cuts the slide's tissue into a non-overlapping tile grid (at level 0 or at
`target_mpp`), scores each tile and keeps the N best with a minimum spacing between their centres
(greedy non-maximum suppression: tiles in descending score order, a tile is kept when its centre
is at least `min_spacing_px` level-0 pixels from every tile kept so far; ties go to the earlier
tile in row-major order). `write_suggestions` writes them as QuPath GeoJSON annotation rectangles
(classification "To annotate", properties `score` and `rank`, also as QuPath measurements), which
QuPath opens with *File > Import objects*.

Scores (higher = more uncertain = more useful to annotate):

- `samples == 1`: the mean over the tile of the per-pixel entropy of the predicted class
  probabilities (stochastic methods average their own `n_samples` draws inside `predict_proba`),
  divided by log K, so in [0, 1];
- `samples > 1`: the tile mean of the method's `predict_with_uncertainty(..., n_samples=samples)`
  map: the spread over `samples` draws for stochastic methods (L-Diffusion: mutual information;
  LDSeg: SD over runs; cDAL: vote spread), the normalised entropy for deterministic ones.

Tiles are read exactly as `slide predict` reads them, and each batch gets its own generator seeded
with `derive_seed(seed, slide id, batch index)`, so the result is deterministic for a seed.

Example:
    >>> from ldiffusion.methods import load_segmenter                      # doctest: +SKIP
    >>> seg = load_segmenter("runs/unet-monuseg")                           # doctest: +SKIP
    >>> res = suggest_regions(seg, "slide.svs", n=20, tile_px=512)          # doctest: +SKIP
    >>> write_suggestions("next.geojson", res)                              # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldiffusion.core.errors import InputError
from ldiffusion.core.io import atomic_write
from ldiffusion.core.rng import derive_seed, make_generator
from ldiffusion.infer.slide import SlideReader, open_slide
from ldiffusion.infer.slide_predict import TileSegmenter, slide_id
from ldiffusion.infer.tiling import tile_grid
from ldiffusion.infer.tissue import detect_tissue, select_tiles

logger = logging.getLogger(__name__)

SUGGESTED_CLASS = "To annotate"
SUGGESTED_COLOR = (255, 200, 0)


@dataclasses.dataclass(frozen=True)
class Suggestion:
    """One suggested region: a rectangle in level-0 pixels and its uncertainty score.

    Attributes:
        rank: 1 = most uncertain.
        score: mean uncertainty of the tile (see the module docstring), in [0, 1].
        x, y, w, h: the rectangle in level-0 pixels.
    """

    rank: int
    score: float
    x: float
    y: float
    w: float
    h: float

    @property
    def centre(self) -> tuple[float, float]:
        """Centre (x, y) in level-0 pixels."""
        return (self.x + self.w / 2, self.y + self.h / 2)


@dataclasses.dataclass(frozen=True)
class SuggestResult:
    """What `suggest_regions` found: the suggestions and the scores of every tile considered."""

    slide: str
    id: str
    suggestions: list[Suggestion]
    n_tiles: int
    bounds_offset: tuple[int, int]
    mpp: float | None


def normalised_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Return the per-pixel entropy of probabilities (B, K, H, W) divided by log K: (B, H, W) in [0, 1].

    Example:
        >>> p = torch.tensor([0.5, 0.5]).view(1, 2, 1, 1)
        >>> round(float(normalised_entropy(p)), 6)
        1.0
    """
    k = probs.shape[1]
    ent = -(probs * torch.log(probs.clamp_min(1e-12))).sum(1)
    return ent / max(math.log(k), 1e-12) if k > 1 else torch.zeros_like(ent)


def tile_scores(
    segmenter: TileSegmenter,
    images: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    samples: int = 1,
) -> torch.Tensor:
    """Return the uncertainty score (B,) of a batch of tiles (B, 3, H, W) float32 in [0, 1].

    `samples == 1`: mean normalised entropy of `predict_proba`; `samples > 1`: mean of the
    method's `predict_with_uncertainty(..., n_samples=samples)` map (entropy when it has none).
    """
    if samples < 1:
        raise InputError(f"samples={samples} should be >= 1")
    if samples > 1 and hasattr(segmenter, "predict_with_uncertainty"):
        _, unc = segmenter.predict_with_uncertainty(images, generator=generator, n_samples=samples)  # type: ignore[attr-defined]
        return unc.float().flatten(1).mean(1)
    probs = segmenter.predict_proba(images, generator=generator)
    return normalised_entropy(probs.float()).flatten(1).mean(1)


def select_spaced(centres: np.ndarray, scores: np.ndarray, n: int, min_spacing: float) -> list[int]:
    """Greedy non-maximum suppression: indices of up to `n` items, best first, centres >= `min_spacing` apart.

    Args:
        centres: (N, 2) centre coordinates.
        scores: (N,) scores, higher is better; ties go to the lower index.
        n: number wanted.
        min_spacing: minimum Euclidean distance between kept centres (0 = plain top-n).

    Example:
        >>> c = np.array([[0, 0], [1, 0], [10, 0]], float)
        >>> select_spaced(c, np.array([3.0, 2.0, 1.0]), 3, 5.0)
        [0, 2]
    """
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(centres) != len(scores):
        raise InputError(f"centres ({len(centres)}) and scores ({len(scores)}) differ in length")
    order = np.lexsort((np.arange(len(scores)), -scores))
    kept: list[int] = []
    for i in order.tolist():
        if len(kept) >= n:
            break
        if kept and min_spacing > 0:
            d = np.hypot(*(centres[kept] - centres[i]).T)
            if (d < min_spacing).any():
                continue
        kept.append(i)
    return kept


def suggest_regions(
    segmenter: TileSegmenter,
    slide: str | Path | SlideReader,
    *,
    n: int = 20,
    tile_px: int = 512,
    min_spacing_px: float | None = None,
    mpp: float | None = None,
    target_mpp: float | None = None,
    samples: int = 1,
    batch_size: int = 8,
    seed: int = 0,
    tissue: bool = True,
    min_tissue: float = 0.5,
    progress: bool = True,
) -> SuggestResult:
    """Score the tissue tiles of a slide and return the `n` most uncertain, spaced apart.

    Args:
        segmenter: any `TileSegmenter` (e.g. `ldiffusion.methods.load_segmenter(run)`).
        slide: slide file or an open `SlideReader`.
        n: number of suggestions (fewer when not enough tiles satisfy the spacing; logged).
        tile_px: tile side in working pixels (rounded up to the segmenter's `size_divisor`).
        min_spacing_px: minimum distance between suggestion centres in level-0 pixels
            (default: one tile side, so suggestions do not overlap).
        mpp: microns per level-0 pixel, overriding the slide metadata.
        target_mpp: score at this resolution (needs the mpp); None = level 0.
        samples: draws per tile for the uncertainty (see the module docstring).
        batch_size: tiles per forward pass.
        seed: seed of stochastic methods (per batch: `derive_seed(seed, slide id, batch)`).
        tissue: consider only tiles with tissue (Otsu on saturation of a thumbnail).
        min_tissue: minimum tissue fraction of a tile.
        progress: show a tqdm bar on stderr.

    Returns:
        A `SuggestResult` with the suggestions (rank 1 first) in level-0 pixels.

    Raises:
        InputError: bad arguments, an unreadable slide, or no tile to score.
    """
    if n < 1:
        raise InputError(f"n={n} should be >= 1")
    if batch_size < 1:
        raise InputError(f"batch_size={batch_size} should be >= 1")
    if not 0.0 <= min_tissue < 1.0:
        raise InputError(f"min_tissue={min_tissue} is out of range; expected [0, 1)")
    own = not isinstance(slide, SlideReader)
    reader = open_slide(slide, mpp=mpp) if own else slide  # type: ignore[arg-type]
    try:
        if not own and mpp is not None:
            reader.mpp = mpp
        return _suggest(
            segmenter,
            reader,
            n=n,
            tile_px=tile_px,
            min_spacing_px=min_spacing_px,
            target_mpp=target_mpp,
            samples=samples,
            batch_size=batch_size,
            seed=seed,
            tissue=tissue,
            min_tissue=min_tissue,
            progress=progress,
        )
    finally:
        if own:
            reader.close()


def _suggest(
    segmenter: TileSegmenter,
    reader: SlideReader,
    *,
    n: int,
    tile_px: int,
    min_spacing_px: float | None,
    target_mpp: float | None,
    samples: int,
    batch_size: int,
    seed: int,
    tissue: bool,
    min_tissue: float,
    progress: bool,
) -> SuggestResult:
    div = max(int(getattr(segmenter, "size_divisor", 1) or 1), 1)
    tile = -(-int(tile_px) // div) * div
    if reader.mpp is None and target_mpp is not None:
        raise InputError(
            f"{reader.path}: target_mpp={target_mpp} needs the slide's mpp, which its metadata "
            "lacks; pass --mpp"
        )
    scale = float(target_mpp / reader.mpp) if (target_mpp is not None and reader.mpp) else 1.0
    if abs(scale - 1.0) < 1e-3:
        scale = 1.0
    if scale < 1.0:
        raise InputError(f"target_mpp={target_mpp} is finer than the slide's level 0 ({reader.mpp} µm/px)")
    W0, H0 = reader.dimensions
    if reader.bounds_size is not None:
        (ox, oy), (bw, bh) = reader.bounds_offset, reader.bounds_size
    else:
        ox, oy, bw, bh = 0, 0, W0, H0
    width, height = max(1, math.ceil(bw / scale)), max(1, math.ceil(bh / scale))
    name = slide_id(reader.path)
    tiles = tile_grid(width, height, tile, 0)
    if tissue:
        tiles = select_tiles(
            tiles, detect_tissue(reader), scale=scale, origin=(ox, oy), min_fraction=min_tissue
        )
    if not tiles:
        raise InputError(
            f"{reader.path}: no tile with tissue fraction > {min_tissue}; lower --min-tissue "
            "or pass --no-tissue"
        )
    device = getattr(segmenter, "device", None)
    device = device if isinstance(device, torch.device) else torch.device("cpu")
    scores = np.empty(len(tiles), dtype=np.float64)
    bar = _bar(len(tiles), name, progress)
    try:
        for b, start in enumerate(range(0, len(tiles), batch_size)):
            batch = tiles[start : start + batch_size]
            imgs = np.stack(
                [
                    reader.read_scaled(round(ox + t.x * scale), round(oy + t.y * scale), t.w, t.h, scale)
                    for t in batch
                ]
            )
            x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div_(255.0).to(device)
            gen = make_generator(derive_seed(seed, name, b), device)
            with torch.no_grad():
                s = tile_scores(segmenter, x, generator=gen, samples=samples)
            scores[start : start + len(batch)] = s.detach().double().cpu().numpy()
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    side = tile * scale
    centres = np.array([(ox + (t.x + t.w / 2) * scale, oy + (t.y + t.h / 2) * scale) for t in tiles])
    spacing = side if min_spacing_px is None else float(min_spacing_px)
    if spacing < 0:
        raise InputError(f"min_spacing_px={spacing} should be >= 0")
    keep = select_spaced(centres, scores, n, spacing)
    if len(keep) < n:
        logger.warning(
            "%s: only %d of %d suggestions fit with a spacing of %g px among %d tiles",
            name,
            len(keep),
            n,
            spacing,
            len(tiles),
        )
    sugg = [
        Suggestion(
            rank=r,
            score=float(scores[i]),
            x=float(ox + tiles[i].x * scale),
            y=float(oy + tiles[i].y * scale),
            w=float(side),
            h=float(side),
        )
        for r, i in enumerate(keep, start=1)
    ]
    logger.info(
        "%s: scored %d tiles, suggested %d (top score %.4f)",
        name,
        len(tiles),
        len(sugg),
        sugg[0].score if sugg else float("nan"),
    )
    return SuggestResult(str(reader.path), name, sugg, len(tiles), tuple(reader.bounds_offset), reader.mpp)


def _bar(total: int, name: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"suggest {name}", unit="tile", dynamic_ncols=True, leave=False)


def suggestion_features(
    suggestions: list[Suggestion],
    *,
    offset: tuple[float, float] = (0.0, 0.0),
    class_name: str = SUGGESTED_CLASS,
    color: tuple[int, int, int] = SUGGESTED_COLOR,
) -> list[dict[str, Any]]:
    """Return QuPath GeoJSON annotation rectangles (valid polygons) for `suggestions`.

    Args:
        suggestions: from `suggest_regions`.
        offset: subtracted from the level-0 coordinates (the slide bounds offset for QuPath's frame).
        class_name, color: QuPath classification of the rectangles.
    """
    feats = []
    for s in suggestions:
        x0, y0 = s.x - offset[0], s.y - offset[1]
        x1, y1 = x0 + s.w, y0 + s.h
        ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]  # counter-clockwise in y-up (RFC 7946)
        ring = [[int(v) if float(v).is_integer() else round(v, 3) for v in p] for p in ring]
        feats.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "annotation",
                    "name": f"suggestion {s.rank}",
                    "classification": {"name": class_name, "color": list(color)},
                    "isLocked": False,
                    "score": s.score,
                    "rank": s.rank,
                    "measurements": {"uncertainty": s.score, "rank": s.rank},
                },
            }
        )
    return feats


def write_suggestions(
    path: str | Path,
    result: SuggestResult | list[Suggestion],
    *,
    coords: str = "qupath",
    class_name: str = SUGGESTED_CLASS,
    color: tuple[int, int, int] = SUGGESTED_COLOR,
) -> int:
    """Write suggestions as a QuPath GeoJSON FeatureCollection atomically; return the feature count.

    Args:
        path: destination `.geojson`.
        result: a `SuggestResult` (or a plain list of suggestions in level-0 pixels).
        coords: "qupath" (level 0 minus the slide bounds offset) or "level0".
        class_name, color: QuPath classification.
    """
    import json

    if coords not in ("qupath", "level0"):
        raise InputError(f"coords={coords!r} is not valid; choose 'qupath' or 'level0'")
    if isinstance(result, SuggestResult):
        sugg = result.suggestions
        offset = tuple(float(v) for v in result.bounds_offset) if coords == "qupath" else (0.0, 0.0)
    else:
        sugg, offset = list(result), (0.0, 0.0)
    feats = suggestion_features(sugg, offset=offset, class_name=class_name, color=color)  # type: ignore[arg-type]
    with atomic_write(path, "w") as f:
        json.dump({"type": "FeatureCollection", "features": feats}, f, indent=1)
        f.write("\n")
    return len(feats)


__all__ = [
    "SuggestResult",
    "Suggestion",
    "normalised_entropy",
    "select_spaced",
    "suggest_regions",
    "suggestion_features",
    "tile_scores",
    "write_suggestions",
]
