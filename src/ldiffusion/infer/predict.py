"""Image -> class probabilities with a sliding window, and folder prediction writers.

`predict_image` cuts an image into overlapping tiles (`tile_px`, `overlap_px`), runs
`Segmenter.predict_proba` on batches of tiles and blends them with a Gaussian weight (centre
weighted, nnU-Net / MONAI style, sigma = tile / 8), so tile borders leave no seams. Images smaller
than a tile are padded (reflect) and cropped back. The tile size is rounded up to the segmenter's
`size_divisor`.
"""

from __future__ import annotations

import collections
import io
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ldiffusion.core.errors import InputError
from ldiffusion.core.io import atomic_write_bytes
from ldiffusion.core.rng import derive_seed, make_generator
from ldiffusion.data.format import IMAGE_SUFFIXES, find_images, read_dataset_info, read_image, write_png
from ldiffusion.infer.outputs import check_case_id, check_out_dir, claim_outputs, output_path
from ldiffusion.methods.base import Segmenter

logger = logging.getLogger(__name__)


def gaussian_weight(tile_px: int, sigma_scale: float = 1 / 8, floor: float = 1e-3) -> torch.Tensor:
    """Return a (tile_px, tile_px) Gaussian blending weight with maximum 1 and minimum >= `floor`."""
    c = (tile_px - 1) / 2
    sigma = max(tile_px * sigma_scale, 1e-6)
    x = torch.arange(tile_px, dtype=torch.float64)
    g = torch.exp(-((x - c) ** 2) / (2 * sigma**2))
    w = torch.outer(g, g)
    w = w / w.max()
    return w.clamp_min(floor).float()


def tile_starts(size: int, tile_px: int, stride: int) -> list[int]:
    """Return tile start offsets covering [0, size) (the last tile is flush with the end)."""
    if size <= tile_px:
        return [0]
    starts = list(range(0, size - tile_px + 1, stride))
    if starts[-1] != size - tile_px:
        starts.append(size - tile_px)
    return starts


def _pad(x: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    if not (ph or pw):
        return x
    h, w = x.shape[-2:]
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


@torch.no_grad()
def predict_image(segmenter: Segmenter, image: np.ndarray, *, tile_px: int | None = None,
                  overlap_px: int | None = None, batch_size: int = 4,
                  generator: torch.Generator | None = None, return_uncertainty: bool = False,
                  n_samples: int | None = None) -> Any:
    """Predict class probabilities of one image with a Gaussian-blended sliding window.

    Args:
        segmenter: trained segmenter (its device is used).
        image: (H, W, 3) uint8 RGB.
        tile_px: tile side (default: the method's `crop_px`), rounded up to `size_divisor`.
        overlap_px: overlap between neighbouring tiles (default: tile_px // 4).
        batch_size: tiles per forward pass.
        generator: generator of stochastic methods.
        return_uncertainty: also return the blended uncertainty map.
        n_samples: draws of stochastic methods for the uncertainty (method default when None).

    Returns:
        probs (K, H, W) float32 summing to 1, or `(probs, uncertainty (H, W))` with `return_uncertainty`.

    Raises:
        InputError: `image` is not (H, W, 3) uint8 or the tiling is invalid.
    """
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise InputError(f"expected an image (H, W, 3) uint8, got {image.shape} {image.dtype}")
    d = max(int(getattr(segmenter, "size_divisor", 1)), 1)
    tile = int(tile_px if tile_px is not None else segmenter.cfg.crop_px)
    tile = -(-tile // d) * d
    overlap = tile // 4 if overlap_px is None else int(overlap_px)
    if not 0 <= overlap < tile:
        raise InputError(f"overlap_px={overlap} is out of range; expected [0, tile_px={tile})")
    if batch_size < 1:
        raise InputError(f"batch_size={batch_size} should be >= 1")
    stride = tile - overlap
    device = segmenter.device
    h, w = image.shape[:2]
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)[None].to(device)
    x = _pad(x, max(tile - h, 0), max(tile - w, 0))
    hp, wp = x.shape[-2:]
    ys, xs = tile_starts(hp, tile, stride), tile_starts(wp, tile, stride)
    coords = [(y, x0) for y in ys for x0 in xs]
    weight = gaussian_weight(tile).to(device)
    acc: torch.Tensor | None = None
    acc_u = torch.zeros(hp, wp, device=device) if return_uncertainty else None
    wsum = torch.zeros(hp, wp, device=device)
    for i in range(0, len(coords), batch_size):
        chunk = coords[i:i + batch_size]
        tiles = torch.cat([x[..., y:y + tile, x0:x0 + tile] for y, x0 in chunk])
        if return_uncertainty:
            probs, unc = segmenter.predict_with_uncertainty(tiles, generator=generator, n_samples=n_samples)
        else:
            probs, unc = segmenter.predict_proba(tiles, generator=generator), None
        probs = probs.float()
        if acc is None:
            acc = torch.zeros(probs.shape[1], hp, wp, device=device)
        for j, (y, x0) in enumerate(chunk):
            acc[:, y:y + tile, x0:x0 + tile] += probs[j] * weight
            wsum[y:y + tile, x0:x0 + tile] += weight
            if acc_u is not None and unc is not None:
                acc_u[y:y + tile, x0:x0 + tile] += unc[j].float() * weight
    assert acc is not None
    probs_out = (acc / wsum)[:, :h, :w]
    probs_out = probs_out / probs_out.sum(0, keepdim=True).clamp_min(1e-12)
    if acc_u is not None:
        return probs_out.cpu(), (acc_u / wsum)[:h, :w].cpu()
    return probs_out.cpu()


def default_palette(num_classes: int) -> np.ndarray:
    """Return a fixed (K, 3) uint8 palette (black background, then distinct colours)."""
    base = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
            (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]
    out = [base[i % len(base)] for i in range(num_classes)]
    return np.array(out, dtype=np.uint8)


def overlay(image: np.ndarray, mask: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend class colours (class 0 left untouched) over an (H, W, 3) uint8 image."""
    pal = np.asarray(palette, dtype=np.float32)
    colour = pal[np.clip(mask, 0, len(pal) - 1)]
    out = image.astype(np.float32)
    fg = (mask > 0)[..., None]
    out = np.where(fg, (1 - alpha) * out + alpha * colour, out)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr)
    atomic_write_bytes(path, buf.getvalue())


def collect_inputs(images: Sequence[str | Path] | None = None, data_root: str | Path | None = None,
                   split: str = "test") -> tuple[list[tuple[str, Path]], np.ndarray | None]:
    """Return `[(id, image path)]` and the data set palette (None for loose images).

    Raises:
        InputError: nothing to predict, a missing file, or duplicate ids.
    """
    pairs: list[tuple[str, Path]] = []
    palette = None
    if data_root is not None:
        from ldiffusion.data.dataset import sample_path

        info = read_dataset_info(data_root)
        palette = info.palette
        for case_id in info.ids(split):
            check_case_id(case_id, Path(data_root) / "dataset.json")
            p = sample_path(data_root, "images", case_id)
            if p is None:
                raise InputError(
                    f"{Path(data_root) / 'images' / (case_id + '.png')}: image of id {case_id!r} not found"
                )
            pairs.append((case_id, p))
    for item in images or []:
        p = Path(item)
        if p.is_dir():
            pairs += [(f.stem, f) for f in find_images(p)]
        elif p.is_file():
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                raise InputError(f"{p}: not an image file; expected one of {list(IMAGE_SUFFIXES)}")
            pairs.append((p.stem, p))
        else:
            raise InputError(f"{p}: no such image file or folder")
    if not pairs:
        raise InputError("nothing to predict: give a data set (--data) or image files/folders")
    seen: set[str] = set()
    for case_id, p in pairs:
        if case_id in seen:
            raise InputError(f"{p}: id {case_id!r} appears twice; outputs are named by id")
        seen.add(case_id)
    return pairs, palette


def _output_names(case_id: str, save_prob: bool, save_uncertainty: bool, segmenter: Segmenter) -> list[str]:
    """File names `predict_folder` writes for one id."""
    names = [f"{case_id}.png", f"{case_id}_overlay.png"]
    if getattr(getattr(segmenter, "cfg", None), "target", "semantic") == "contour":
        names.append(f"{case_id}_inst.png")
    if save_prob:
        names.append(f"{case_id}_prob.npy")
    if save_uncertainty:
        names.append(f"{case_id}_unc.png")
    return names


def predict_folder(segmenter: Segmenter, out_dir: str | Path, *, images: Sequence[str | Path] | None = None,
                   data_root: str | Path | None = None, split: str = "test", tile_px: int | None = None,
                   overlap_px: int | None = None, batch_size: int = 4, seed: int = 0,
                   n_samples: int | None = None, save_prob: bool = False, save_uncertainty: bool = False,
                   progress: bool = True, overwrite: bool = False) -> list[str]:
    """Predict every image of a data set split and/or of image files/folders into `out_dir`.

    Writes, per image id: `<id>.png` (uint8 class map, the format `evaluate` reads),
    `<id>_overlay.png` (class colours over the image; data set palette when known), and on request
    `<id>_prob.npy` (float16 (K, H, W)) and `<id>_unc.png` (uncertainty in [0, 1] scaled to uint8).
    Each image uses its own generator seeded with `derive_seed(seed, id)`, so results do not depend
    on the order or on which other images are predicted. All writes are atomic.

    Refuses (InputError, nothing written) an `out_dir` that directly holds an input image or is a
    data set's folder / images / labels, an id that is not one file-name component, two ids whose
    outputs share a name, and an existing file that an earlier `predict` did not write there
    (listed in `out_dir/predict.json`) unless `overwrite`.

    Returns:
        The predicted ids, in order.
    """
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    if not isinstance(segmenter, Segmenter):
        raise InputError(
            f"method {getattr(segmenter, 'name', type(segmenter).__name__)!r} is not a segmenter; "
            "it cannot predict class maps"
        )
    pairs, palette = collect_inputs(images, data_root, split)
    if palette is None or len(palette) < segmenter.num_classes:
        stored = segmenter.extra_info.get("palette")
        palette = np.array(stored, dtype=np.uint8) if stored else default_palette(segmenter.num_classes)
    out = check_out_dir(out_dir, [p for _, p in pairs], data_root)
    names = [n for i, _ in pairs for n in _output_names(i, save_prob, save_uncertainty, segmenter)]
    if len(set(names)) != len(names):
        dup = next(n for n, c in collections.Counter(names).items() if c > 1)
        raise InputError(f"{out / dup}: two inputs would write this file; rename one of them")
    claim_outputs(out, names, overwrite=overwrite)
    segmenter.eval()
    done = []
    with logging_redirect_tqdm():
        for case_id, path in tqdm(pairs, desc="predict", file=sys.stderr, disable=not progress, leave=False):
            image = read_image(path)
            gen = make_generator(derive_seed(seed, case_id), segmenter.device)
            if save_uncertainty:
                probs, unc = predict_image(segmenter, image, tile_px=tile_px, overlap_px=overlap_px,
                                           batch_size=batch_size, generator=gen, return_uncertainty=True,
                                           n_samples=n_samples)
            else:
                probs, unc = predict_image(segmenter, image, tile_px=tile_px, overlap_px=overlap_px,
                                           batch_size=batch_size, generator=gen), None
            mask = probs.argmax(0).numpy().astype(np.uint8)
            write_png(output_path(out, f"{case_id}.png"), mask)
            write_png(output_path(out, f"{case_id}_overlay.png"), overlay(image, mask, palette))
            if save_prob:
                _save_npy(output_path(out, f"{case_id}_prob.npy"), probs.numpy().astype(np.float16))
            if unc is not None:
                u8 = np.clip(np.rint(unc.numpy() * 255), 0, 255).astype(np.uint8)
                write_png(output_path(out, f"{case_id}_unc.png"), u8)
            done.append(case_id)
    logger.info("wrote %d predictions to %s", len(done), out)
    return done


__all__ = ["collect_inputs", "default_palette", "gaussian_weight", "overlay", "predict_folder",
           "predict_image", "tile_starts"]
