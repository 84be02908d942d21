"""Gland object metrics of the GlaS challenge (Sirinukunwattana et al., Med. Image Anal. 2017).

Inputs are (H, W) instance maps (0 = background), truth G = {G_i} and segmentation S = {S_j}.

* Object F1: by default a segmented object is a TP when its IoU with a truth object is > 0.5
  (`criterion="iou"`, the rule of this project's issue; such pairs are unique). The challenge's
  own rule, `criterion="coverage"`, pairs each S_j with the truth object it overlaps most and
  counts a TP when that overlap is > 50 % of the truth object's area. FP = unmatched S_j,
  FN = unmatched G_i, F1 = 2TP / (2TP + FP + FN).
* Object Dice = 1/2 [sum_i g_i Dice(G_i, S*(G_i)) + sum_j s_j Dice(G*(S_j), S_j)], with
  g_i = |G_i| / sum |G|, s_j = |S_j| / sum |S|, S*(G_i) the segmented object of largest
  intersection with G_i (Dice 0 when none overlaps), G*(S_j) likewise.
* Object Hausdorff: the same weighted sum of Hausdorff distances (Euclidean, pixel centres, in px).
  A partner is the object of largest intersection; an object that overlaps nothing is paired
  with the object of the other side nearest to it in Hausdorff distance (the challenge rule).
  When the other side has no object at all the distance is the image diagonal (our rule; the
  challenge leaves it open), and an image with objects on one side only scores the diagonal.
* An image with no object on either side: F1, Dice, Hausdorff NaN (skipped by means).

`GlandAccumulator` reports the per-image mean and the "aggregated" figures (F1 from TP/FP/FN summed
over the split; Dice and Hausdorff with weights over all objects of the split).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import numpy as np
from scipy import ndimage as ndi

from ldiffusion.eval.instance import Overlaps, _match, overlaps, relabel_contiguous

logger = logging.getLogger(__name__)

__all__ = ["GlandAccumulator", "hausdorff", "object_dice", "object_f1", "object_hausdorff"]


def _f1_counts(o: Overlaps, criterion: Literal["iou", "coverage"]) -> tuple[int, int, int]:
    if criterion == "iou":
        tp = int(_match(o, 0.5)[0].size)
    elif criterion == "coverage":
        if o.t.size:
            order = np.lexsort((o.t, -o.inter, o.p))  # per pred: largest intersection first
            first = np.ones(order.size, dtype=bool)
            first[1:] = o.p[order][1:] != o.p[order][:-1]
            best = order[first]
            tp = int(np.sum(o.inter[best] > 0.5 * o.true_area[o.t[best]]))
        else:
            tp = 0
    else:
        raise ValueError(f"criterion={criterion!r}; expected 'iou' or 'coverage'")
    return tp, o.n_pred - tp, o.n_true - tp


def object_f1(true_inst: np.ndarray, pred_inst: np.ndarray,
              criterion: Literal["iou", "coverage"] = "iou") -> dict[str, Any]:
    """Return {"f1", "precision", "recall", "tp", "fp", "fn"} of one image (NaN ratios when empty).

    Example:
        >>> object_f1(np.array([[1, 1, 0, 2]]), np.array([[3, 3, 0, 0]]))["f1"]  # 2/(2+0+1)
        0.6666666666666666
    """
    tp, fp, fn = _f1_counts(overlaps(true_inst, pred_inst), criterion)
    return _f1_dict(tp, fp, fn)


def _f1_dict(tp: int, fp: int, fn: int) -> dict[str, Any]:
    nan = float("nan")
    return {"f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else nan,
            "precision": tp / (tp + fp) if tp + fp else nan,
            "recall": tp / (tp + fn) if tp + fn else nan, "tp": tp, "fp": fp, "fn": fn}


def _best_partner(o: Overlaps, side: Literal["t", "p"]) -> dict[int, tuple[int, int]]:
    """Map each object of `side` that overlaps something to (partner id, intersection)."""
    own, other = (o.t, o.p) if side == "t" else (o.p, o.t)
    if own.size == 0:
        return {}
    order = np.lexsort((other, -o.inter, own))
    first = np.ones(order.size, dtype=bool)
    first[1:] = own[order][1:] != own[order][:-1]
    best = order[first]
    return {int(a): (int(b), int(i)) for a, b, i in zip(own[best], other[best], o.inter[best], strict=True)}


def _dice_sums(o: Overlaps) -> tuple[float, float, float, float]:
    """Return (sum_i |G_i| Dice_i, sum |G|, sum_j |S_j| Dice_j, sum |S|)."""
    sums = []
    for side, area, other_area in (("t", o.true_area, o.pred_area), ("p", o.pred_area, o.true_area)):
        best = _best_partner(o, side)  # type: ignore[arg-type]
        num = sum(area[a] * 2 * i / (area[a] + other_area[b]) for a, (b, i) in best.items())
        sums += [float(num), float(area[1:].sum())]
    return sums[0], sums[1], sums[2], sums[3]


def object_dice(true_inst: np.ndarray, pred_inst: np.ndarray) -> float:
    """Object-level Dice of one image (GlaS); NaN with no object on either side, 0 with one side empty.

    Example:
        >>> object_dice(np.array([[1, 1, 0, 0]]), np.array([[2, 0, 0, 0]]))  # 2*1/(2+1)
        0.6666666666666666
    """
    gn, gd, sn, sd = _dice_sums(overlaps(true_inst, pred_inst))
    if gd == 0 and sd == 0:
        return float("nan")
    return 0.5 * ((gn / gd if gd else 0.0) + (sn / sd if sd else 0.0))


def hausdorff(a: np.ndarray, b: np.ndarray) -> float:
    """Hausdorff distance (px, Euclidean between pixel centres) of two non-empty boolean masks.

    Example:
        >>> a = np.zeros((1, 5), bool); b = a.copy(); a[0, 0] = True; b[0, 1:4] = True
        >>> hausdorff(a, b)  # farthest b pixel (col 3) is 3 px from a
        3.0
    """
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if not a.any() or not b.any():
        raise ValueError("hausdorff needs two non-empty masks")
    rows = np.flatnonzero((a | b).any(axis=1))
    cols = np.flatnonzero((a | b).any(axis=0))
    win = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    a, b = a[win], b[win]
    return float(max(ndi.distance_transform_edt(~b)[a].max(), ndi.distance_transform_edt(~a)[b].max()))


def _hausdorff_sums(t: np.ndarray, p: np.ndarray, o: Overlaps) -> tuple[float, float, float, float]:
    """Return (sum_i |G_i| H_i, sum |G|, sum_j |S_j| H_j, sum |S|) with the pairing of the docstring."""
    diag = math.hypot(*t.shape)
    slices = {"t": ndi.find_objects(t), "p": ndi.find_objects(p)}
    maps = {"t": t, "p": p}
    cache: dict[tuple[int, int], float] = {}

    def dist(i: int, j: int) -> float:  # truth id i, pred id j
        if (i, j) not in cache:
            si, sj = slices["t"][i - 1], slices["p"][j - 1]
            win = tuple(slice(min(x.start, y.start), max(x.stop, y.stop))
                        for x, y in zip(si, sj, strict=True))
            cache[(i, j)] = hausdorff(t[win] == i, p[win] == j)
        return cache[(i, j)]

    sums = []
    for side, other, area in (("t", "p", o.true_area), ("p", "t", o.pred_area)):
        best = _best_partner(o, side)  # type: ignore[arg-type]
        n_own = int(maps[side].max(initial=0))
        n_other = int(maps[other].max(initial=0))
        num = 0.0
        for a in range(1, n_own + 1):
            if area[a] == 0:
                continue
            if n_other == 0:
                h = diag
            elif a in best:
                b = best[a][0]
                h = dist(a, b) if side == "t" else dist(b, a)
            else:
                h = min(dist(a, b) if side == "t" else dist(b, a) for b in range(1, n_other + 1)
                        if slices[other][b - 1] is not None)
            num += float(area[a]) * h
        sums += [num, float(area[1:].sum())]
    return sums[0], sums[1], sums[2], sums[3]


def object_hausdorff(true_inst: np.ndarray, pred_inst: np.ndarray) -> float:
    """Object-level Hausdorff distance of one image in px (GlaS); see the module docstring for empties.

    Example:
        >>> t = np.array([[1, 0, 0, 0]]); p = np.array([[0, 0, 0, 5]])
        >>> object_hausdorff(t, p)  # no overlap: nearest object, 3 px away
        3.0
    """
    t = relabel_contiguous(true_inst)
    p = relabel_contiguous(pred_inst)
    o = overlaps(t, p)
    if o.n_true == 0 and o.n_pred == 0:
        return float("nan")
    if o.n_true == 0 or o.n_pred == 0:
        return math.hypot(*t.shape)
    gn, gd, sn, sd = _hausdorff_sums(t, p, o)
    return 0.5 * (gn / gd + sn / sd)


class GlandAccumulator:
    """Accumulate GlaS object metrics over images with constant memory (see the module docstring)."""

    def __init__(self, criterion: Literal["iou", "coverage"] = "iou") -> None:
        self.criterion = criterion
        self.n_images = 0
        self._counts = np.zeros(3, dtype=np.int64)
        self._dice = np.zeros(4)
        self._haus = np.zeros(4)
        self._mean_sums = {"f1": 0.0, "dice": 0.0, "hausdorff": 0.0}
        self._n = 0

    def update(self, true_inst: np.ndarray, pred_inst: np.ndarray) -> dict[str, float]:
        """Add one image; return its own {"f1", "dice", "hausdorff"} (NaN when it has no object)."""
        t = relabel_contiguous(true_inst)
        p = relabel_contiguous(pred_inst)
        o = overlaps(t, p)
        self.n_images += 1
        tp, fp, fn = _f1_counts(o, self.criterion)
        self._counts += (tp, fp, fn)
        d = _dice_sums(o)
        self._dice += d
        if o.n_true == 0 and o.n_pred == 0:
            return {"f1": float("nan"), "dice": float("nan"), "hausdorff": float("nan")}
        h = _hausdorff_sums(t, p, o)
        self._haus += h
        rec = {"f1": _f1_dict(tp, fp, fn)["f1"],
               "dice": 0.5 * ((d[0] / d[1] if d[1] else 0.0) + (d[2] / d[3] if d[3] else 0.0)),
               "hausdorff": (0.5 * (h[0] / h[1] + h[2] / h[3]) if h[1] and h[3]
                             else math.hypot(*t.shape))}
        for k, v in rec.items():
            self._mean_sums[k] += v
        self._n += 1
        return rec

    def result(self) -> dict[str, Any]:
        """Return per-image means ("f1", "dice", "hausdorff", "n") and "*_aggregated" figures."""
        tp, fp, fn = (int(x) for x in self._counts)
        f1 = _f1_dict(tp, fp, fn)
        d, h = self._dice, self._haus
        out: dict[str, Any] = {k: (v / self._n if self._n else None) for k, v in self._mean_sums.items()}
        out["n"] = self._n
        out["n_images"] = self.n_images
        out["f1_aggregated"] = f1["f1"] if tp + fp + fn else None
        out["precision_aggregated"] = f1["precision"] if tp + fp else None
        out["recall_aggregated"] = f1["recall"] if tp + fn else None
        out["tp"], out["fp"], out["fn"] = tp, fp, fn
        out["dice_aggregated"] = (0.5 * ((d[0] / d[1] if d[1] else 0.0) + (d[2] / d[3] if d[3] else 0.0))
                                  if d[1] + d[3] else None)
        out["hausdorff_aggregated"] = (0.5 * ((h[0] / h[1] if h[1] else 0.0) + (h[2] / h[3] if h[3] else 0.0))
                                       if h[1] + h[3] else None)
        out["convention"] = (
            f"GlaS object metrics (Sirinukunwattana 2017); F1 match: "
            f"{'IoU > 0.5' if self.criterion == 'iou' else 'pred covers > 50% of the truth object'}; "
            "Dice/Hausdorff partners by largest intersection, non-overlapping objects paired with the "
            "Hausdorff-nearest object, missing side = image diagonal; hausdorff in px; f1/dice/hausdorff "
            "= per-image mean over the n images with objects; *_aggregated = TP/FP/FN summed and "
            "object weights taken over the whole split")
        return out
