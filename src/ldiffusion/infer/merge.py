"""Disk-backed, resumable blending of overlapping tile probabilities into a label map.

Memory does not grow with the slide: tile probabilities go to disk as one `.npy` file per batch,
and the label map is a chunked, compressed zarr array. Tiles are processed in a fixed row-major
order; after each batch, every `chunk_px` x `chunk_px` block of the label map that no later tile
can touch is *finalised*: the probabilities of the tiles covering it are blended with a Gaussian
weight (in tile index order, so the float sums are always the same), argmax'ed and written as one
whole zarr chunk. Batch files no longer needed are then deleted.

Crash safety and byte-identical resume:

1. a batch file is written atomically (tmp + rename);
2. finalised chunks are written atomically by zarr and are a pure function of the batch files;
3. `state.json` (batches done, rows finalised, run parameters) is written atomically last.

A crash at any point leaves a state from which the same batches are recomputed (each batch has a
fixed composition and generator seed) and the same chunks are rewritten with the same bytes, so an
interrupted and resumed run produces exactly the output of an uninterrupted one.

Pixels covered by no tile (background skipped by tissue detection) get label 0.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ldiffusion.core.errors import CheckpointError, InputError
from ldiffusion.core.io import atomic_write, read_json, write_json
from ldiffusion.infer.tiling import Tile, gaussian_weight

logger = logging.getLogger(__name__)

STATE_VERSION = 1


def require_zarr() -> Any:
    """Import zarr (v3 API) or raise an error naming the extra."""
    try:
        import zarr
    except ImportError as e:
        raise InputError(
            "slide prediction needs the 'slides' extra (zarr): pip install \"ldiffusion[slides]\""
        ) from e
    return zarr


def batch_slices(n_tiles: int, batch_size: int) -> list[tuple[int, int]]:
    """Return the fixed `(start, stop)` tile ranges of each batch."""
    return [(i, min(i + batch_size, n_tiles)) for i in range(0, n_tiles, batch_size)]


class TileMerger:
    """Blend tile probabilities into a zarr label map, one batch at a time, resumably.

    Args:
        work_dir: folder for `labels.zarr`, `tiles/` and `state.json` (created).
        width, height: size of the label map (working pixels).
        num_classes: K.
        tiles: the tiles that will be predicted, in row-major order (y non-decreasing).
        batch_size: tiles per batch (fixes the batch composition).
        params: run parameters stored in the state; a resume with different ones is refused.
        resume: continue from `state.json` when present (else start afresh).
        chunk_px: label-map chunk side (finalisation granularity).
        sigma_scale: Gaussian blending sigma as a fraction of the tile side.
        keep_tiles: keep batch files after finalisation (debugging, `blend_region` over everything).
        uncertainty: also finalise `uncertainty.zarr` (uint8, 255 = 1): the normalised entropy of the
            blended probabilities (`uncertainty_from_blend`).
        labels_fn: turns blended probabilities (K, h, w) (zeros where no tile) into (h, w) labels in
            place of the arg-max; it may look at neighbours up to `margin_px` away (e.g. an erosion).
        margin_px: each chunk is relabelled from a region grown by this many pixels (clipped to the
            map) and cut back, so the result does not depend on where the chunk borders lie; a chunk
            row is finalised only once the tiles of its margin are in.
    """

    def __init__(
        self,
        work_dir: str | Path,
        width: int,
        height: int,
        num_classes: int,
        tiles: Sequence[Tile],
        batch_size: int,
        *,
        params: dict[str, Any] | None = None,
        resume: bool = False,
        chunk_px: int = 512,
        sigma_scale: float = 0.125,
        keep_tiles: bool = False,
        uncertainty: bool = False,
        labels_fn: Callable[[np.ndarray], np.ndarray] | None = None,
        margin_px: int = 0,
    ) -> None:
        if any(b.y < a.y for a, b in itertools.pairwise(tiles)):
            raise InputError("tiles must be in row-major order (non-decreasing y)")
        if batch_size < 1:
            raise InputError(f"batch_size={batch_size} should be >= 1")
        if margin_px < 0:
            raise InputError(f"margin_px={margin_px} should be >= 0")
        self.labels_fn, self.margin_px = labels_fn, int(margin_px)
        self.work_dir = Path(work_dir)
        self.width, self.height, self.num_classes = int(width), int(height), int(num_classes)
        self.tiles = list(tiles)
        self.batch_size = int(batch_size)
        self.batches = batch_slices(len(self.tiles), batch_size)
        self.chunk_px = int(chunk_px)
        self.keep_tiles = keep_tiles
        self.tile_dir = self.work_dir / "tiles"
        self.state_path = self.work_dir / "state.json"
        self.labels_path = self.work_dir / "labels.zarr"
        self.uncertainty_path = self.work_dir / "uncertainty.zarr"
        self.params = {
            "version": STATE_VERSION,
            "width": self.width,
            "height": self.height,
            "num_classes": self.num_classes,
            "batch_size": int(batch_size),
            "chunk_px": self.chunk_px,
            "sigma_scale": sigma_scale,
            "tiles": [[t.x, t.y, t.w, t.h] for t in self.tiles],
            **({"uncertainty": True} if uncertainty else {}),
            **({"margin_px": self.margin_px} if self.margin_px else {}),
            **(params or {}),
        }
        self._weights: dict[int, np.ndarray] = {}
        self._sigma_scale = sigma_scale
        self._ty = np.array([t.y for t in self.tiles], dtype=np.int64)
        self._tx = np.array([t.x for t in self.tiles], dtype=np.int64)
        self._tw = np.array([t.w for t in self.tiles], dtype=np.int64)
        self._th = np.array([t.h for t in self.tiles], dtype=np.int64)
        self.batches_done = 0
        self.rows_done = 0
        zarr = require_zarr()
        state = self._load_state() if resume else None
        if state is None:
            if self.work_dir.exists():
                shutil.rmtree(self.work_dir)
            self.tile_dir.mkdir(parents=True)
            c = self.chunk_px
            def new_map(path: Path) -> Any:
                return zarr.create_array(store=str(path), shape=(self.height, self.width),
                                         chunks=(min(c, self.height), min(c, self.width)), dtype="uint8",
                                         fill_value=0, overwrite=True)

            self.labels = new_map(self.labels_path)
            self.uncertainty = new_map(self.uncertainty_path) if uncertainty else None
            self._save_state()
        else:
            self.batches_done = int(state["batches_done"])
            self.rows_done = int(state["rows_done"])
            self.labels = zarr.open_array(str(self.labels_path), mode="r+")
            self.uncertainty = zarr.open_array(str(self.uncertainty_path), mode="r+") if uncertainty else None
            self.tile_dir.mkdir(parents=True, exist_ok=True)
            logger.info(
                "resuming %s: %d/%d batches done, %d/%d rows final",
                self.work_dir,
                self.batches_done,
                len(self.batches),
                self.rows_done,
                self.height,
            )
            self._advance()

    # ------------------------------------------------------------------ state
    def _load_state(self) -> dict[str, Any] | None:
        if not self.state_path.is_file() or not self.labels_path.exists():
            return None
        try:
            state = read_json(self.state_path)
        except ValueError:
            return None
        if state.get("params") != self.params:
            old = state.get("params") or {}
            diff = sorted(k for k in set(old) | set(self.params) if old.get(k) != self.params.get(k))
            raise CheckpointError(
                f"{self.state_path}: cannot resume, the run parameters changed ({diff}); "
                "rerun without --resume to start again"
            )
        return state

    def _save_state(self) -> None:
        write_json(
            self.state_path,
            {
                "params": self.params,
                "batches_done": self.batches_done,
                "rows_done": self.rows_done,
                "n_batches": len(self.batches),
            },
        )

    @property
    def done(self) -> bool:
        """True when every batch is merged and the whole label map is final."""
        return self.batches_done >= len(self.batches) and self.rows_done >= self.height

    def pending_batches(self) -> list[int]:
        """Indices of the batches still to predict."""
        return list(range(self.batches_done, len(self.batches)))

    def batch_tiles(self, b: int) -> list[Tile]:
        """Tiles of batch `b`."""
        s, e = self.batches[b]
        return self.tiles[s:e]

    def _batch_path(self, b: int) -> Path:
        return self.tile_dir / f"b{b:06d}.npy"

    # ------------------------------------------------------------------ merging
    def add_batch(self, b: int, probs: np.ndarray) -> None:
        """Store the probabilities of batch `b` (must be the next one) and finalise what it completes.

        Args:
            b: batch index (== `batches_done`).
            probs: (B, K, tile_h, tile_w) float32 probabilities of the batch's tiles.
        """
        if b != self.batches_done:
            raise InputError(f"batch {b} given but batch {self.batches_done} is next (batches go in order)")
        tiles = self.batch_tiles(b)
        expected = (len(tiles), self.num_classes, tiles[0].h, tiles[0].w)
        if tuple(probs.shape) != expected:
            raise InputError(
                f"batch {b}: expected probabilities of shape {expected}, got {tuple(probs.shape)}"
            )
        with atomic_write(self._batch_path(b), "wb") as f:
            np.save(f, np.ascontiguousarray(probs, dtype=np.float32))
        self.batches_done = b + 1
        self._advance()

    def finish(self) -> None:
        """Finalise every row that can be (all of them once every batch is added; no-op otherwise)."""
        self._advance()

    def _final_rows(self) -> int:
        """Rows that no pending tile touches, rounded down to whole chunk rows (all rows when done)."""
        if self.batches_done >= len(self.batches):
            return self.height
        next_y = int(self.tiles[self.batches[self.batches_done][0]].y) - self.margin_px
        return max(0, min((next_y // self.chunk_px) * self.chunk_px, self.height))

    def _advance(self) -> None:
        target = self._final_rows()
        c = self.chunk_px
        for y0 in range(self.rows_done, target, c):
            y1 = min(y0 + c, self.height)
            for x0 in range(0, self.width, c):
                x1 = min(x0 + c, self.width)
                # batch files are memory-mapped per block and released right after, so the
                # resident memory stays at a few tiles whatever the slide width
                self.labels[y0:y1, x0:x1], acc, wsum = self._chunk_labels(x0, y0, x1, y1)
                if self.uncertainty is not None:
                    self.uncertainty[y0:y1, x0:x1] = uncertainty_from_blend(acc, wsum)
        self.rows_done = max(self.rows_done, target)
        self._save_state()
        self._cleanup()

    def _chunk_labels(self, x0: int, y0: int, x1: int, y1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Labels (h, w) uint8 of one chunk, with its blend `(acc (K, h, w), wsum (h, w))`."""
        if self.labels_fn is None:
            acc, wsum = self.blend_region(x0, y0, x1, y1)
            return labels_from_blend(acc, wsum), acc, wsum
        m = self.margin_px
        px0, py0 = max(0, x0 - m), max(0, y0 - m)
        px1, py1 = min(self.width, x1 + m), min(self.height, y1 + m)
        acc, wsum = self.blend_region(px0, py0, px1, py1)
        probs = acc / np.maximum(wsum, 1e-12)[None]
        lab = np.asarray(self.labels_fn(probs)).astype(np.uint8)
        lab[wsum <= 0] = 0
        inner = (slice(y0 - py0, y1 - py0), slice(x0 - px0, x1 - px0))
        return lab[inner], acc[(slice(None), *inner)], wsum[inner]

    def _cleanup(self) -> None:
        """Delete batch files whose tiles lie entirely in finalised rows."""
        if self.keep_tiles:
            return
        for b in range(self.batches_done):
            p = self._batch_path(b)
            if not p.exists():
                continue
            s, e = self.batches[b]
            bottom = int((self._ty[s:e] + self._th[s:e]).max())
            if bottom <= self.rows_done - self.margin_px or self.rows_done >= self.height:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    def _weight(self, t: Tile) -> np.ndarray:
        key = t.h * 100003 + t.w
        if key not in self._weights:
            if t.h == t.w:
                self._weights[key] = gaussian_weight(t.w, self._sigma_scale)
            else:  # separable: use the geometric tile size
                gy, gx = gaussian_weight(t.h, self._sigma_scale), gaussian_weight(t.w, self._sigma_scale)
                self._weights[key] = np.sqrt(np.outer(gy.max(1), gx.max(0))).astype(np.float32)
        return self._weights[key]

    def blend_region(
        self, x0: int, y0: int, x1: int, y1: int, cache: dict[int, np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Blend the stored tiles over a region of the label map.

        Only tiles of batches already added contribute. Tiles are summed in index order.

        Returns:
            `(acc (K, h, w) float32 = sum of weight * probs, wsum (h, w) float32 = sum of weights)`;
            blended probabilities are `acc / wsum` where `wsum > 0`.
        """
        h, w = y1 - y0, x1 - x0
        acc = np.zeros((self.num_classes, h, w), np.float32)
        wsum = np.zeros((h, w), np.float32)
        n_avail = self.batches[self.batches_done - 1][1] if self.batches_done else 0
        hit = np.nonzero(
            (self._ty[:n_avail] < y1)
            & (self._ty[:n_avail] + self._th[:n_avail] > y0)
            & (self._tx[:n_avail] < x1)
            & (self._tx[:n_avail] + self._tw[:n_avail] > x0)
        )[0]
        cache = {} if cache is None else cache
        for i in hit.tolist():
            t = self.tiles[i]
            b = i // self.batch_size
            pos = i - self.batches[b][0]
            if b not in cache:
                path = self._batch_path(b)
                if not path.is_file():
                    raise CheckpointError(f"{path}: tile probabilities missing; rerun without --resume")
                cache[b] = np.load(path, mmap_mode="r")
            ry0, ry1 = max(t.y, y0), min(t.y + t.h, y1)
            rx0, rx1 = max(t.x, x0), min(t.x + t.w, x1)
            p = np.asarray(cache[b][pos, :, ry0 - t.y : ry1 - t.y, rx0 - t.x : rx1 - t.x], dtype=np.float32)
            wt = self._weight(t)[ry0 - t.y : ry1 - t.y, rx0 - t.x : rx1 - t.x]
            acc[:, ry0 - y0 : ry1 - y0, rx0 - x0 : rx1 - x0] += p * wt
            wsum[ry0 - y0 : ry1 - y0, rx0 - x0 : rx1 - x0] += wt
        return acc, wsum


def labels_from_blend(acc: np.ndarray, wsum: np.ndarray) -> np.ndarray:
    """Return uint8 labels = argmax over K of `acc` (first class on ties), 0 where `wsum == 0`."""
    lab = acc.argmax(0).astype(np.uint8)
    lab[wsum <= 0] = 0
    return lab


def uncertainty_from_blend(acc: np.ndarray, wsum: np.ndarray) -> np.ndarray:
    """Return uint8 uncertainty = 255 * entropy(acc / wsum) / log K (0 where `wsum == 0` or K == 1)."""
    k = acc.shape[0]
    if k < 2:
        return np.zeros(wsum.shape, np.uint8)
    p = acc / np.maximum(wsum, 1e-12)[None]
    p = p / np.maximum(p.sum(0, keepdims=True), 1e-12)
    ent = -(p * np.log(np.maximum(p, 1e-12))).sum(0) / np.log(k)
    out = np.clip(np.rint(ent * 255.0), 0, 255).astype(np.uint8)
    out[wsum <= 0] = 0
    return out


# ---------------------------------------------------------------------- pyramid


def pyramid_ratios(
    level_downsamples: Sequence[float], width: int, height: int, min_side: int = 1024
) -> list[int]:
    """Integer ratios between consecutive label pyramid levels.

    Mirrors the slide's levels (ratio = rounded quotient of consecutive downsamples, levels with a
    ratio < 2 dropped); a single-level slide gets halvings until the longer side is <= `min_side`.
    """
    ratios: list[int] = []
    prev = 1.0
    for ds in list(level_downsamples)[1:]:
        r = round(ds / prev)
        if r >= 2:
            ratios.append(r)
            prev = prev * r
    if not ratios:
        side = max(width, height)
        while side > min_side:
            ratios.append(2)
            side = math.ceil(side / 2)
    return ratios


def build_pyramid(
    labels: Any, group_dir: str | Path, ratios: Sequence[int], chunk_px: int = 512, prefix: str = "level"
) -> list[Any]:
    """Write downsampled levels (nearest: every `r`-th pixel) as zarr arrays `<prefix>1`, `<prefix>2`, ...

    Args:
        labels: level-0 zarr array (H, W) uint8.
        group_dir: folder for the level arrays.
        ratios: integer ratio of each level to the previous one.

    Returns:
        The list of levels, level 0 first.
    """
    zarr = require_zarr()
    levels = [labels]
    for i, r in enumerate(ratios, start=1):
        prev = levels[-1]
        ph, pw = prev.shape
        h, w = math.ceil(ph / r), math.ceil(pw / r)
        arr = zarr.create_array(
            store=str(Path(group_dir) / f"{prefix}{i}.zarr"),
            shape=(h, w),
            chunks=(min(chunk_px, h), min(chunk_px, w)),
            dtype="uint8",
            fill_value=0,
            overwrite=True,
        )
        for y0 in range(0, h, chunk_px):
            y1 = min(y0 + chunk_px, h)
            for x0 in range(0, w, chunk_px):
                x1 = min(x0 + chunk_px, w)
                block = np.asarray(prev[y0 * r : min(y1 * r, ph), x0 * r : min(x1 * r, pw)])
                arr[y0:y1, x0:x1] = block[::r, ::r]
        levels.append(arr)
    return levels
