"""Semantic segmentation metrics from one confusion matrix accumulated over a whole split.

Conventions (the same everywhere in `ldiffusion`):

* The confusion matrix `C` has rows = ground truth, columns = prediction; pixels whose truth is
  `ignore_index` are dropped before counting. `row_c` (support) is the number of truth pixels of
  class c, `col_c` the number of predicted pixels of class c, `C_cc` the true positives.
* Per class: Dice_c = 2 C_cc / (row_c + col_c), IoU_c = C_cc / (row_c + col_c - C_cc),
  pixel accuracy (recall) PA_c = C_cc / row_c.
* A class absent from both truth and prediction has no score (None) and is skipped by every
  mean; it is **never scored 1**. A class predicted but absent from truth scores Dice = IoU = 0
  and is included in DICE and mIoU; it has no recall, so it is not part of MPA.
* DICE and mIoU are means over the scored classes present in truth or prediction; MPA is the mean
  recall over the scored classes present in truth; FwIoU = sum_c (row_c / sum row) IoU_c.
* `foreground_only=True` scores classes 1..K-1 only (class 0 = background; the cell tables of
  the L-Diffusion paper): background pixels still enter the foreground classes' FP/FN counts,
  and the FwIoU frequencies are renormalised over foreground truth pixels.

`per_image_mean` is the other averaging (one score per image, then a NaN-aware mean over
images, MONAI style) and is always reported under its own name.

Example:
    >>> import numpy as np
    >>> cm = confusion_matrix(np.array([[0, 1], [1, 1]]), np.array([[0, 1], [0, 1]]), 2)
    >>> cm.tolist()
    [[1, 0], [1, 2]]
    >>> round(semantic_scores(cm)["miou"], 4)  # (1/2 + 2/3) / 2
    0.5833
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ldiffusion.core.errors import InputError

logger = logging.getLogger(__name__)

__all__ = ["ConfusionMatrix", "PerImageMean", "confusion_matrix", "semantic_convention",
           "semantic_scores"]


def _check_pair(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    truth = np.asarray(truth)
    pred = np.asarray(pred)
    if truth.shape != pred.shape:
        raise InputError(f"truth shape {truth.shape} != prediction shape {pred.shape}; "
                         "expected label maps of the same (H, W)")
    for name, a in (("truth", truth), ("pred", pred)):
        if not np.issubdtype(a.dtype, np.integer) and a.dtype != bool:
            raise InputError(f"{name} must be an integer label array, got dtype {a.dtype}")
    return truth, pred


def confusion_matrix(truth: np.ndarray, pred: np.ndarray, num_classes: int,
                     ignore_index: int | None = 255) -> np.ndarray:
    """Count (truth, prediction) pixel pairs.

    Args:
        truth: (H, W) (any shape) integer class ids in [0, K) or `ignore_index`.
        pred: same shape, integer class ids in [0, K).
        num_classes: K, including background.
        ignore_index: truth value whose pixels are dropped (None: no ignore value).

    Returns:
        (K, K) int64 matrix, rows = truth class, columns = predicted class.

    Raises:
        InputError: shapes differ, or a truth / prediction value (at a non-ignored pixel) is
            outside [0, K); the message lists the offending values.
    """
    truth, pred = _check_pair(truth, pred)
    k = int(num_classes)
    if k < 1:
        raise InputError(f"num_classes must be >= 1, got {num_classes}")
    t = truth.ravel().astype(np.int64)
    p = pred.ravel().astype(np.int64)
    if ignore_index is not None:
        keep = t != ignore_index
        if not keep.all():
            t, p = t[keep], p[keep]
    for name, a in (("truth", t), ("prediction", p)):
        if a.size and (a.min() < 0 or a.max() >= k):
            bad = np.unique(a[(a < 0) | (a >= k)])
            extra = "" if name == "prediction" or ignore_index is None else f" or {ignore_index} (ignore)"
            raise InputError(f"{name} has values {bad[:10].tolist()} outside the class ids [0, {k}){extra}")
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k).astype(np.int64)


class ConfusionMatrix:
    """Accumulate a (K, K) confusion matrix over images; memory does not grow with their number.

    Example:
        >>> acc = ConfusionMatrix(2)
        >>> _ = acc.update(np.array([[0, 1]]), np.array([[0, 0]]))
        >>> acc.matrix.tolist(), acc.n_images
        ([[1, 0], [1, 0]], 1)
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255) -> None:
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        self.n_images = 0

    def update(self, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
        """Add one image; return its own (K, K) matrix."""
        cm = confusion_matrix(truth, pred, self.num_classes, self.ignore_index)
        self.matrix += cm
        self.n_images += 1
        return cm

    def reset(self) -> None:
        """Zero the counts."""
        self.matrix[:] = 0
        self.n_images = 0


def _div(num: float, den: float) -> float | None:
    return None if den == 0 else float(num) / float(den)


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def semantic_convention(foreground_only: bool, ignore_index: int | None = 255) -> str:
    """Return the sentence describing how `semantic_scores` averages (written into reports)."""
    scored = ("foreground classes only (1..K-1; background pixels still count as FP/FN of the "
              "foreground classes; FwIoU frequencies renormalised over foreground truth pixels)"
              if foreground_only else "all classes including background")
    ign = f"truth pixels == {ignore_index} dropped" if ignore_index is not None else "no ignore label"
    return (f"dataset-level confusion matrix summed over all images ({ign}); scored: {scored}; "
            "per class Dice=2TP/(2TP+FP+FN), IoU=TP/(TP+FP+FN), pixel accuracy=TP/(TP+FN); "
            "DICE and mIoU = mean over scored classes present in truth or prediction "
            "(absent from both: skipped, never 1; predicted but absent from truth: 0); "
            "MPA = mean recall over scored classes present in truth; "
            "FwIoU = sum of IoU weighted by ground-truth pixel frequency")


def semantic_scores(cm: np.ndarray, foreground_only: bool = False,
                    class_names: Sequence[str] | None = None,
                    ignore_index: int | None = 255) -> dict[str, Any]:
    """Compute Dice, IoU, pixel accuracy per class and their means from a confusion matrix.

    Args:
        cm: (K, K) counts, rows = truth, columns = prediction (`confusion_matrix`).
        foreground_only: score classes 1..K-1 only (see the module docstring).
        class_names: K names for the per-class table (default "class_<c>").
        ignore_index: only used in the `convention` text.

    Returns:
        {"dice", "miou", "mpa", "fwiou", "accuracy", "n_pixels", "n_classes_scored", "convention",
        "foreground_only", "per_class": [{"id", "name", "dice", "iou", "pixel_accuracy", "support",
        "predicted", "scored"}]}. Fractions in [0, 1]; None where undefined (no class present,
        or the class is absent from both sides; `pixel_accuracy` None when support is 0).
        `accuracy` = correctly classified scored truth pixels / scored truth pixels.

    Raises:
        InputError: `cm` is not square or `class_names` has the wrong length.
    """
    cm = np.asarray(cm, dtype=np.int64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise InputError(f"confusion matrix must be (K, K), got shape {cm.shape}")
    k = cm.shape[0]
    names = list(class_names) if class_names is not None else [f"class_{c}" for c in range(k)]
    if len(names) != k:
        raise InputError(f"class_names has {len(names)} names for {k} classes")
    tp = np.diag(cm)
    row = cm.sum(axis=1)  # truth pixels per class (support)
    col = cm.sum(axis=0)  # predicted pixels per class
    scored = [c for c in range(k) if not (foreground_only and c == 0)]
    per_class = []
    for c in range(k):
        present = row[c] + col[c] > 0
        per_class.append({
            "id": c, "name": names[c],
            "dice": _div(2 * tp[c], row[c] + col[c]) if present else None,
            "iou": _div(tp[c], row[c] + col[c] - tp[c]) if present else None,
            "pixel_accuracy": _div(tp[c], row[c]),
            "support": int(row[c]), "predicted": int(col[c]), "scored": c in scored,
        })
    sel = [per_class[c] for c in scored]
    total = float(sum(row[c] for c in scored))
    fwiou = (float(sum(row[c] / total * per_class[c]["iou"] for c in scored if row[c] > 0))
             if total > 0 else None)
    return {
        "dice": _mean([p["dice"] for p in sel]),
        "miou": _mean([p["iou"] for p in sel]),
        "mpa": _mean([p["pixel_accuracy"] for p in sel]),
        "fwiou": fwiou,
        "accuracy": _div(sum(tp[c] for c in scored), total),
        "n_pixels": int(row.sum()),
        "n_classes_scored": sum(1 for p in sel if p["dice"] is not None),
        "foreground_only": bool(foreground_only),
        "convention": semantic_convention(foreground_only, ignore_index),
        "per_class": per_class,
    }


def image_scores(cm: np.ndarray, foreground_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Return per-class Dice and IoU of one image's confusion matrix, NaN for absent classes.

    A class absent from both truth and prediction of the image is NaN; in foreground-only mode
    the background entry is NaN too. A class predicted but absent from truth scores 0.
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    den = cm.sum(axis=1) + cm.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(den > 0, 2 * tp / den, np.nan)
        iou = np.where(den > 0, tp / (den - tp), np.nan)
    if foreground_only:
        dice[0] = iou[0] = np.nan
    return dice, iou


class PerImageMean:
    """Per-image-mean Dice / IoU: score each image, then a NaN-aware mean over images.

    Per image, a class absent from both truth and prediction is NaN (skipped) and the image score
    is the mean over its remaining scored classes (NaN when none). The reported figure is the mean
    over images with a non-NaN score, with that count (`n`), as MONAI's `do_metric_reduction`
    does. Unlike MONAI's `ignore_empty=True`, an image whose truth lacks a class but whose
    prediction has it scores 0 for that class, not NaN. Only sums are kept (memory constant).
    """

    def __init__(self, num_classes: int, foreground_only: bool = False) -> None:
        self.num_classes = int(num_classes)
        self.foreground_only = foreground_only
        k = self.num_classes
        self._sum = {m: 0.0 for m in ("dice", "iou")}
        self._sq = {m: 0.0 for m in ("dice", "iou")}
        self._n = 0
        self._cls_sum = {m: np.zeros(k) for m in ("dice", "iou")}
        self._cls_n = np.zeros(k, dtype=np.int64)
        self.n_images = 0

    def update(self, cm: np.ndarray) -> None:
        """Add one image given its (K, K) confusion matrix."""
        dice, iou = image_scores(cm, self.foreground_only)
        self.n_images += 1
        ok = ~np.isnan(dice)
        self._cls_n += ok
        if not ok.any():
            return
        self._n += 1
        for m, v in (("dice", dice), ("iou", iou)):
            s = float(np.mean(v[ok]))
            self._sum[m] += s
            self._sq[m] += s * s
            self._cls_sum[m] += np.where(ok, v, 0.0)

    def result(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """Return {"dice", "iou", "dice_std", "iou_std", "n", "n_images", "per_class", "convention"}."""
        out: dict[str, Any] = {}
        for m in ("dice", "iou"):
            if self._n:
                mu = self._sum[m] / self._n
                out[m] = mu
                out[f"{m}_std"] = math.sqrt(max(self._sq[m] / self._n - mu * mu, 0.0))
            else:
                out[m] = out[f"{m}_std"] = None
        names = list(class_names) if class_names is not None else [f"class_{c}"
                                                                     for c in range(self.num_classes)]
        out["n"] = self._n
        out["n_images"] = self.n_images
        out["per_class"] = [
            {"id": c, "name": names[c], "n": int(self._cls_n[c]),
             "dice": float(self._cls_sum["dice"][c] / self._cls_n[c]) if self._cls_n[c] else None,
             "iou": float(self._cls_sum["iou"][c] / self._cls_n[c]) if self._cls_n[c] else None}
            for c in range(self.num_classes)]
        out["convention"] = (
            "per-image mean (NOT the dataset-level figure): per image, Dice/IoU per "
            f"{'foreground ' if self.foreground_only else ''}class, NaN for a class absent from both "
            "truth and prediction (predicted-only: 0), mean over the image's non-NaN classes; then "
            "mean (and population std) over the n images with a score; per_class: mean over the "
            "n images where the class is present")
        return out
