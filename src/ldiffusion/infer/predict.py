"""Image -> class probabilities with a sliding window, and folder prediction writers.

`predict_image` cuts an image into overlapping tiles (`tile_px`, `overlap_px`), runs
`Segmenter.predict_proba` on batches of tiles and blends them with a Gaussian weight (centre
weighted, nnU-Net / MONAI style, sigma = tile / 8), so tile borders leave no seams
(`methods.sliding`, shared with validation). Images smaller than a tile are padded (reflect) and
cropped back. The tile size is rounded up to the segmenter's `size_divisor`.
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

from ldiffusion.core.errors import InputError
from ldiffusion.core.io import atomic_write_bytes
from ldiffusion.core.rng import derive_seed, make_generator
from ldiffusion.data.format import IMAGE_SUFFIXES, find_images, read_dataset_info, read_image, write_png
from ldiffusion.data.stain_norm import LabStats, lab_stats, reinhard
from ldiffusion.data.targets import instances_from_contour, redraw_markers
from ldiffusion.infer.outputs import check_case_id, check_out_dir, claim_outputs, output_path
from ldiffusion.infer.tiling import gaussian_weight, tile_starts
from ldiffusion.methods.base import Segmenter
from ldiffusion.methods.sliding import sliding_window_proba

logger = logging.getLogger(__name__)


def predict_image(segmenter: Segmenter, image: np.ndarray, *, tile_px: int | None = None,
                  overlap_px: int | None = None, batch_size: int = 4,
                  generator: torch.Generator | None = None, return_uncertainty: bool = False,
                  n_samples: int | None = None, tta: bool = False) -> Any:
    """Predict class probabilities of one image with a Gaussian-blended sliding window.

    The same function (`methods.sliding.sliding_window_proba`) scores the validation images during
    training, so a model is selected on exactly this output.

    Args:
        segmenter: trained segmenter (its device is used).
        image: (H, W, 3) uint8 RGB.
        tile_px: tile side (default: `methods.sliding.default_tile_px`: the training crop, or at
            least 512 px / the whole image for wide-context networks), rounded up to `size_divisor`.
        overlap_px: overlap between neighbouring tiles (default: tile_px // 4).
        batch_size: tiles per forward pass.
        generator: generator of stochastic methods.
        return_uncertainty: also return the blended uncertainty map.
        n_samples: draws of stochastic methods for the uncertainty (method default when None).
        tta: test-time augmentation: average over the 8 flips / 90-degree rotations (8x slower).

    Returns:
        probs (K, H, W) float32 summing to 1, or `(probs, uncertainty (H, W))` with `return_uncertainty`.

    Raises:
        InputError: `image` is not (H, W, 3) uint8 or the tiling is invalid.
    """
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise InputError(f"expected an image (H, W, 3) uint8, got {image.shape} {image.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)[None]
    return sliding_window_proba(segmenter, x, tile_px=tile_px, overlap_px=overlap_px, batch_size=batch_size,
                                generator=generator, return_uncertainty=return_uncertainty,
                                n_samples=n_samples, tta=tta)


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


def contour_instances(probs: np.ndarray, cfg: Any) -> tuple[np.ndarray, np.ndarray]:
    """Instances and class map of one contour prediction, built with the config's post-processing keys.

    Args:
        probs: (K + 1, H, W) probabilities (channel K the boundary).
        cfg: a method config with `marker_threshold`, `marker_erosion_px` and `min_object_px`.

    Returns:
        (instances (H, W) int32, class map (H, W) uint8 over the data set's K classes).
    """
    class_map = redraw_markers(probs, marker_threshold=cfg.marker_threshold,
                               marker_erosion_px=int(cfg.marker_erosion_px))
    return instances_from_contour(class_map, probs.shape[0] - 1, min_size=int(cfg.min_object_px))


def predict_folder(segmenter: Segmenter, out_dir: str | Path, *, images: Sequence[str | Path] | None = None,
                   data_root: str | Path | None = None, split: str = "test", tile_px: int | None = None,
                   overlap_px: int | None = None, batch_size: int = 4, seed: int = 0,
                   n_samples: int | None = None, save_prob: bool = False, save_uncertainty: bool = False,
                   progress: bool = True, overwrite: bool = False, tta: bool = False,
                   stain_target: LabStats | None = None) -> list[str]:
    """Predict every image of a data set split and/or of image files/folders into `out_dir`.

    Writes, per image id: `<id>.png` (uint8 class map, the format `evaluate` reads),
    `<id>_overlay.png` (class colours over the image; data set palette when known), and on request
    `<id>_prob.npy` (float16 (K, H, W)) and `<id>_unc.png` (uncertainty in [0, 1] scaled to uint8).
    Each image uses its own generator seeded with `derive_seed(seed, id)`, so results do not depend
    on the order or on which other images are predicted. All writes are atomic. A model trained with
    `target="contour"` also writes `<id>_inst.png` (uint16 instances from `data.targets.
    instances_from_contour` after `redraw_markers` with the config's marker keys, objects under its
    `min_object_px` dropped) and its `<id>.png`
    holds the data set's classes (boundary given back to the objects). `tta` averages the 8 flips /
    rotations of every tile. `stain_target` (`data.stain_norm.reference_stats`) maps each image's
    colours onto it (Reinhard, statistics of the whole image) before prediction; the overlays show the
    image as read.

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
    contour = getattr(segmenter.cfg, "target", "semantic") == "contour"
    done = []
    with logging_redirect_tqdm():
        for case_id, path in tqdm(pairs, desc="predict", file=sys.stderr, disable=not progress, leave=False):
            image = read_image(path)
            model_input = image
            if stain_target is not None:
                model_input = reinhard(image, lab_stats([image], where=str(path)), stain_target)
            gen = make_generator(derive_seed(seed, case_id), segmenter.device)
            if save_uncertainty:
                probs, unc = predict_image(segmenter, model_input, tile_px=tile_px, overlap_px=overlap_px,
                                           batch_size=batch_size, generator=gen, return_uncertainty=True,
                                           n_samples=n_samples, tta=tta)
            else:
                probs, unc = predict_image(segmenter, model_input, tile_px=tile_px, overlap_px=overlap_px,
                                           batch_size=batch_size, generator=gen, tta=tta), None
            if contour:
                inst, mask = contour_instances(probs.numpy(), segmenter.cfg)
                write_png(output_path(out, f"{case_id}_inst.png"), inst.astype(np.uint16))
            else:
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


__all__ = ["collect_inputs", "contour_instances", "default_palette", "gaussian_weight", "overlay",
           "predict_folder", "predict_image", "tile_starts"]
