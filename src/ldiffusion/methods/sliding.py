"""Sliding-window prediction of one image tensor, shared by validation and `predict`.

Validation (checkpoint selection) and the test-time predictor call the same function with the
same tile, so the weights are chosen on exactly the output a user gets. Tiles overlap and are
blended with a Gaussian weight (centre weighted, nnU-Net / MONAI style, sigma = tile / 8), so tile
borders leave no seams; an image smaller than a tile is padded (reflect) and cropped back.

Tile choice (`default_tile_px`): a method whose receptive field exceeds its training crop
(`Segmenter.wide_context`, e.g. the ResNet-encoder U-Net) predicts with tiles of at least 512 px, and
whole images up to 1024 px at once, so it sees as much context as it can use; the others keep their
training crop, the context they were trained on. Optional test-time augmentation averages the
probabilities over the 8 flips / 90-degree rotations of each tile.

A method trained at a working resolution (`MethodConfig.input_scale` s < 1) has the whole image
resized by s first (`data.resample`), tiled and predicted there, and its probabilities resized back,
so the output always has the input's size; tiles are then in working pixels.

A model's `class_bias` (an inference-time key chosen on validation, `benchmarks/choose_class_bias.py`)
reweights the final probabilities (`apply_class_bias`), so the class maps, saved probabilities and
object post-processing of `predict`, validation and `slide predict` all see the same decision.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ldiffusion.core.errors import InputError
from ldiffusion.data.resample import resize_image, resize_proba, scaled_size
from ldiffusion.infer.tiling import gaussian_weight, tile_starts  # pure geometry (numpy), no model code

__all__ = [
    "apply_class_bias", "default_tile_px", "input_scale", "scaled_predict_proba", "sliding_window_proba",
]

#: smallest inference tile of wide-context methods, and the largest image predicted in one piece.
WIDE_TILE_PX, WHOLE_IMAGE_PX = 512, 1024


def _pad(x: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    if not (ph or pw):
        return x
    h, w = x.shape[-2:]
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def default_tile_px(segmenter: Any, height: int, width: int) -> int:
    """Return the inference tile of `segmenter` for an (height, width) image (before rounding).

    The training crop for ordinary methods; for `wide_context` methods max(crop, 512), or the whole
    image when both sides are at most 1024 px.
    """
    crop = int(segmenter.cfg.crop_px)
    if not getattr(segmenter, "wide_context", False):
        return crop
    if max(height, width) <= WHOLE_IMAGE_PX:
        return max(height, width, crop)
    return max(crop, WIDE_TILE_PX)


def input_scale(segmenter: Any) -> float:
    """Return the working-resolution factor of `segmenter` (`cfg.input_scale`, 1.0 when it has none)."""
    cfg = getattr(segmenter, "cfg", None)
    return float(getattr(cfg, "input_scale", 1.0))


def scaled_predict_proba(segmenter: Any, x: torch.Tensor, *,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """`segmenter.predict_proba` of tiles (B, C, H, W) at the segmenter's working resolution.

    With `input_scale` s < 1 the tiles are resized by s, padded (replicate) to `size_divisor`,
    predicted, cropped, and the probabilities resized back to (H, W); s = 1 calls `predict_proba`
    directly. Used where tiles are cut at the input's resolution (`infer.slide_predict`).
    """
    scale = input_scale(segmenter)
    if scale == 1.0:
        return apply_class_bias(segmenter, segmenter.predict_proba(x, generator=generator))
    h, w = x.shape[-2:]
    size = scaled_size(h, w, scale)
    d = max(int(getattr(segmenter, "size_divisor", 1)), 1)
    small = resize_image(x, size)
    ph, pw = -size[0] % d, -size[1] % d
    small = F.pad(small, (0, pw, 0, ph), mode="replicate") if (ph or pw) else small
    p = segmenter.predict_proba(small, generator=generator)[..., :size[0], :size[1]]
    return apply_class_bias(segmenter, resize_proba(p, (h, w)))


def _dihedral(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    x = torch.flip(x, dims=(-1,)) if flip else x
    return torch.rot90(x, k, dims=(-2, -1))


def _undo_dihedral(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    x = torch.rot90(x, -k, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if flip else x


def _tile_proba(segmenter: Any, tiles: torch.Tensor, generator: torch.Generator | None,
                return_uncertainty: bool, n_samples: int | None,
                tta: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Probabilities (B, K, t, t) and uncertainty (B, t, t) or None of a batch of tiles."""
    views = [(k, f) for f in (False, True) for k in range(4)] if tta else [(0, False)]
    probs_sum: torch.Tensor | None = None
    unc_sum: torch.Tensor | None = None
    for k, flip in views:
        view = _dihedral(tiles, k, flip)
        if return_uncertainty:
            p, u = segmenter.predict_with_uncertainty(view, generator=generator, n_samples=n_samples)
            u = _undo_dihedral(u.float(), k, flip)
            unc_sum = u if unc_sum is None else unc_sum + u
        else:
            p = segmenter.predict_proba(view, generator=generator)
        p = _undo_dihedral(p.float(), k, flip)
        probs_sum = p if probs_sum is None else probs_sum + p
    assert probs_sum is not None
    n = len(views)
    return probs_sum / n, (unc_sum / n if unc_sum is not None else None)


@torch.no_grad()
def sliding_window_proba(segmenter: Any, x: torch.Tensor, *, tile_px: int | None = None,
                         overlap_px: int | None = None, batch_size: int = 4,
                         generator: torch.Generator | None = None, return_uncertainty: bool = False,
                         n_samples: int | None = None, tta: bool = False) -> Any:
    """Predict class probabilities of one image with a Gaussian-blended sliding window.

    Args:
        segmenter: a `methods.base.Segmenter` (its device is used).
        x: image (1, C, H, W) float32 in [0, 1].
        tile_px: tile side in working pixels (default: `default_tile_px`), rounded up to `size_divisor`.
        overlap_px: overlap between neighbouring tiles (default: tile_px // 4).
        batch_size: tiles per forward pass.
        generator: generator of stochastic methods.
        return_uncertainty: also return the blended uncertainty map.
        n_samples: draws of stochastic methods for the uncertainty (method default when None).
        tta: average over the 8 flips / 90-degree rotations of every tile (8x the compute).

    Returns:
        probs (K, H, W) float32 on the CPU summing to 1, or `(probs, uncertainty (H, W))`.

    Raises:
        InputError: a bad tiling (overlap outside [0, tile), batch_size < 1).
    """
    if x.ndim != 4 or x.shape[0] != 1:
        raise InputError(f"expected one image (1, C, H, W), got {tuple(x.shape)}")
    scale = input_scale(segmenter)
    unc: torch.Tensor | None = None
    if scale != 1.0:  # predict at the working resolution, then resize back to the input's size
        full = tuple(x.shape[-2:])
        out = _sliding(segmenter, resize_image(x, scaled_size(*full, scale)), tile_px, overlap_px, batch_size,
                       generator, return_uncertainty, n_samples, tta)
        probs, unc = out if return_uncertainty else (out, None)
        if unc is not None:
            unc = F.interpolate(unc[None, None], size=full, mode="bilinear", align_corners=False)[0, 0]
        probs = resize_proba(probs[None], full)[0]
    else:
        out = _sliding(segmenter, x, tile_px, overlap_px, batch_size, generator, return_uncertainty,
                       n_samples, tta)
        probs, unc = out if return_uncertainty else (out, None)
    probs = apply_class_bias(segmenter, probs[None])[0]
    return (probs, unc) if return_uncertainty else probs


def apply_class_bias(segmenter: Any, probs: torch.Tensor) -> torch.Tensor:
    """Reweight probabilities (B, K, H, W) by the segmenter's `class_bias` b (K,): p_c ∝ p_c · exp(b_c).

    Adding b to the log-probabilities moves the arg-max decision between classes (a prior correction,
    for example of a model trained with class weights that over-predicts the rare classes). None
    (the default) returns `probs` unchanged.

    Raises:
        InputError: `class_bias` has not one value per class.
    """
    bias = getattr(getattr(segmenter, "cfg", None), "class_bias", None)
    if bias is None:
        return probs
    k = probs.shape[1]
    if len(bias) != k:
        raise InputError(f"class_bias={list(bias)} has {len(bias)} values; the model has {k} classes "
                         f"(one value per class, background first)")
    w = torch.exp(torch.tensor(bias, dtype=probs.dtype, device=probs.device)).view(1, k, 1, 1)
    out = probs * w
    return out / out.sum(1, keepdim=True).clamp_min(1e-12)


def _sliding(segmenter: Any, x: torch.Tensor, tile_px: int | None, overlap_px: int | None, batch_size: int,
             generator: torch.Generator | None, return_uncertainty: bool, n_samples: int | None,
             tta: bool) -> Any:
    """`sliding_window_proba` at the resolution of `x` (no `input_scale`)."""
    h, w = x.shape[-2:]
    d = max(int(getattr(segmenter, "size_divisor", 1)), 1)
    tile = int(tile_px if tile_px is not None else default_tile_px(segmenter, h, w))
    tile = -(-tile // d) * d
    overlap = tile // 4 if overlap_px is None else int(overlap_px)
    if not 0 <= overlap < tile:
        raise InputError(f"overlap_px={overlap} is out of range; expected [0, tile_px={tile})")
    if batch_size < 1:
        raise InputError(f"batch_size={batch_size} should be >= 1")
    stride = tile - overlap
    device = segmenter.device
    x = _pad(x.to(device), max(tile - h, 0), max(tile - w, 0))
    hp, wp = x.shape[-2:]
    coords = [(y, x0) for y in tile_starts(hp, tile, stride) for x0 in tile_starts(wp, tile, stride)]
    if len(coords) > 1:
        weight = torch.from_numpy(gaussian_weight(tile)).to(device)
    else:
        weight = torch.ones(tile, tile, device=device)
    acc: torch.Tensor | None = None
    acc_u = torch.zeros(hp, wp, device=device) if return_uncertainty else None
    wsum = torch.zeros(hp, wp, device=device)
    for i in range(0, len(coords), batch_size):
        chunk = coords[i:i + batch_size]
        tiles = torch.cat([x[..., y:y + tile, x0:x0 + tile] for y, x0 in chunk])
        probs, unc = _tile_proba(segmenter, tiles, generator, return_uncertainty, n_samples, tta)
        if acc is None:
            acc = torch.zeros(probs.shape[1], hp, wp, device=device)
        for j, (y, x0) in enumerate(chunk):
            acc[:, y:y + tile, x0:x0 + tile] += probs[j] * weight
            wsum[y:y + tile, x0:x0 + tile] += weight
            if acc_u is not None and unc is not None:
                acc_u[y:y + tile, x0:x0 + tile] += unc[j] * weight
    assert acc is not None
    probs_out = (acc / wsum)[:, :h, :w]
    probs_out = probs_out / probs_out.sum(0, keepdim=True).clamp_min(1e-12)
    if acc_u is not None:
        return probs_out.cpu(), (acc_u / wsum)[:h, :w].cpu()
    return probs_out.cpu()
