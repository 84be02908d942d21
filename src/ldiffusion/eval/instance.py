"""Instance (nucleus) metrics: AJI (Kumar et al. 2017), PQ = DQ x SQ, multi-class mPQ (PanNuke).

Inputs are (H, W) integer instance maps, 0 = background, any positive ids (not necessarily
contiguous; they are relabelled internally, so results do not depend on the id values).

Conventions:

* Overlaps are computed sparsely: one `np.bincount` over the joint id `t * (n_pred + 1) + p`
  (or `np.unique` of the overlapping pixels when that table would be large).
* AJI follows Kumar et al. 2017 as implemented in HoVer-Net's `get_fast_aji`: each truth object
  G_i is paired with the prediction S_j of maximum IoU (ties: lowest relabelled id); |G_i ∩ S_j|
  is added to C and |G_i ∪ S_j| to U. A truth object that overlaps no prediction adds |G_i| to U.
  Every prediction never picked adds its area to U. AJI = C / U. An image with no object on
  either side has AJI NaN (skipped by means); objects on one side only give 0.
* PQ: a (truth, prediction) pair with IoU > `iou_threshold` is a TP (unique when the threshold is
  >= 0.5; below 0.5 a maximum-IoU assignment is used, as HoVer-Net does). DQ = TP / (TP + FP/2 + FN/2),
  SQ = sum IoU(TP) / TP (0 when TP = 0, HoVer-Net), PQ = DQ x SQ. No object on either side: all NaN.
* mPQ (PanNuke `compute_stats.py`): per image, PQ per class on the instances of that class,
  averaged over the classes present in the image's truth (`classes_present="truth"`; PanNuke sets
  a class absent from truth to NaN even when predicted) or present on either side ("either").
  `PQAccumulator` gives both the per-image mean and the "aggregated" PQ (TP, FP, FN and the IoU
  sum added over all images before the ratios, as in HoVer-Net's mPQ+).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

import numpy as np

from ldiffusion.core.errors import InputError

logger = logging.getLogger(__name__)

__all__ = ["Overlaps", "PQAccumulator", "aji", "aji_counts", "instance_classes", "mpq",
           "overlaps", "pairwise_iou", "pq", "relabel_contiguous"]

_DENSE_LIMIT = 1 << 22  # joint-id tables up to 4M entries use bincount, larger ones np.unique


def _check_inst(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a)
    if not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
        raise InputError(f"{name} must be an array of non-negative integers, got dtype {a.dtype}")
    if a.size and a.min() < 0:
        raise InputError(f"{name} must be an array of non-negative integers, got min {a.min()}")
    return a


def relabel_contiguous(inst: np.ndarray) -> np.ndarray:
    """Map the ids of an instance map to 1..n in increasing order of the original id (0 stays 0).

    Args:
        inst: (H, W) non-negative integer instance ids.

    Returns:
        (H, W) int32 map with ids 1..n.

    Example:
        >>> relabel_contiguous(np.array([[0, 7], [3, 7]])).tolist()
        [[0, 2], [1, 2]]
    """
    inst = _check_inst(inst, "inst")
    if inst.dtype == bool:
        inst = inst.astype(np.uint8)
    if inst.size == 0:
        return inst.astype(np.int32)
    mx = int(inst.max())
    if mx <= 4 * inst.size + 65536:
        present = np.bincount(inst.ravel(), minlength=mx + 1) > 0
        present[0] = False
        lut = np.cumsum(present).astype(np.int32)
        lut[0] = 0
        return lut[inst]
    ids, inv = np.unique(inst.ravel(), return_inverse=True)
    if ids[0] != 0:
        inv = inv + 1
    return inv.reshape(inst.shape).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Overlaps:
    """Sparse overlap table of two relabelled instance maps.

    Attributes:
        n_true, n_pred: number of objects (ids 1..n after relabelling).
        true_area: (n_true + 1,) pixel counts per truth id (index 0 = background).
        pred_area: (n_pred + 1,) pixel counts per prediction id.
        t, p: (M,) ids of every overlapping pair (both > 0).
        inter: (M,) intersection areas; union: (M,) union areas; iou: (M,) float64.
    """

    n_true: int
    n_pred: int
    true_area: np.ndarray
    pred_area: np.ndarray
    t: np.ndarray
    p: np.ndarray
    inter: np.ndarray
    union: np.ndarray
    iou: np.ndarray


def overlaps(true_inst: np.ndarray, pred_inst: np.ndarray) -> Overlaps:
    """Relabel both maps and count the pixels of every overlapping (truth, prediction) pair."""
    true_inst = _check_inst(true_inst, "true_inst")
    pred_inst = _check_inst(pred_inst, "pred_inst")
    if true_inst.shape != pred_inst.shape:
        raise InputError(f"true_inst shape {true_inst.shape} != pred_inst shape {pred_inst.shape}")
    t = relabel_contiguous(true_inst).ravel().astype(np.int64)
    p = relabel_contiguous(pred_inst).ravel().astype(np.int64)
    nt = int(t.max(initial=0))
    npr = int(p.max(initial=0))
    true_area = np.bincount(t, minlength=nt + 1).astype(np.int64)
    pred_area = np.bincount(p, minlength=npr + 1).astype(np.int64)
    both = (t > 0) & (p > 0)
    joint = t[both] * (npr + 1) + p[both]
    if (nt + 1) * (npr + 1) <= _DENSE_LIMIT:
        counts = np.bincount(joint, minlength=(nt + 1) * (npr + 1))
        keys = np.flatnonzero(counts)
        inter = counts[keys]
    else:
        keys, inter = np.unique(joint, return_counts=True)
    tt, pp = np.divmod(keys, npr + 1)
    inter = inter.astype(np.int64)
    union = true_area[tt] + pred_area[pp] - inter
    return Overlaps(nt, npr, true_area, pred_area, tt, pp, inter, union, inter / union)


def pairwise_iou(true_inst: np.ndarray, pred_inst: np.ndarray) -> np.ndarray:
    """Return the dense (n_true, n_pred) IoU matrix; row i is truth id i+1 after relabelling.

    Example:
        >>> pairwise_iou(np.array([[1, 1, 0, 0]]), np.array([[0, 5, 5, 0]])).tolist()
        [[0.3333333333333333]]
    """
    o = overlaps(true_inst, pred_inst)
    out = np.zeros((o.n_true, o.n_pred))
    out[o.t - 1, o.p - 1] = o.iou
    return out


def aji_counts(true_inst: np.ndarray, pred_inst: np.ndarray) -> tuple[int, int]:
    """Return AJI's (C, U): summed intersections and unions (see the module docstring)."""
    return _aji_counts(overlaps(true_inst, pred_inst))


def _aji_counts(o: Overlaps) -> tuple[int, int]:
    if o.t.size:
        # best prediction per truth object: sort by truth id, then IoU descending, then pred id
        order = np.lexsort((o.p, -o.iou, o.t))
        first = np.ones(order.size, dtype=bool)
        first[1:] = o.t[order][1:] != o.t[order][:-1]
        best = order[first]
    else:
        best = np.zeros(0, dtype=np.int64)
    c = int(o.inter[best].sum())
    u = int(o.union[best].sum())
    paired_t = np.zeros(o.n_true + 1, dtype=bool)
    paired_t[o.t[best]] = True
    used_p = np.zeros(o.n_pred + 1, dtype=bool)
    used_p[o.p[best]] = True
    u += int(o.true_area[1:][~paired_t[1:]].sum())
    u += int(o.pred_area[1:][~used_p[1:]].sum())
    return c, u


def aji(true_inst: np.ndarray, pred_inst: np.ndarray) -> float:
    """Aggregated Jaccard Index of one image (Kumar et al. 2017); NaN with no object on either side.

    Example:
        >>> t = np.array([[1, 1, 0, 0]]); p = np.array([[2, 0, 0, 3]])
        >>> aji(t, p)  # C = 1, U = 2 + 1 (unused pred 3) = 3
        0.3333333333333333
    """
    c, u = aji_counts(true_inst, pred_inst)
    return float("nan") if u == 0 else c / u


def _match(o: Overlaps, iou_threshold: float, t_keep: np.ndarray | None = None,
           p_keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return matched (t, p, iou) arrays among pairs with IoU > threshold (optionally a subset)."""
    sel = o.iou > iou_threshold
    if t_keep is not None:
        sel &= t_keep[o.t]
    if p_keep is not None:
        sel &= p_keep[o.p]
    t, p, iou = o.t[sel], o.p[sel], o.iou[sel]
    if iou_threshold >= 0.5 or t.size == 0:
        return t, p, iou  # IoU > 0.5 pairs are unique on both sides
    from scipy.optimize import linear_sum_assignment

    ut, ti = np.unique(t, return_inverse=True)
    up, pi = np.unique(p, return_inverse=True)
    m = np.zeros((ut.size, up.size))
    m[ti, pi] = iou
    r, c = linear_sum_assignment(-m)
    ok = m[r, c] > iou_threshold
    return ut[r[ok]], up[c[ok]], m[r[ok], c[ok]]


def _pq_from(tp: int, fp: int, fn: int, sum_iou: float) -> dict[str, Any]:
    if tp + fp + fn == 0:
        nan = float("nan")
        return {"dq": nan, "sq": nan, "pq": nan, "tp": 0, "fp": 0, "fn": 0, "sum_iou": 0.0}
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = sum_iou / tp if tp else 0.0
    return {"dq": dq, "sq": sq, "pq": dq * sq, "tp": int(tp), "fp": int(fp), "fn": int(fn),
            "sum_iou": float(sum_iou)}


def pq(true_inst: np.ndarray, pred_inst: np.ndarray, iou_threshold: float = 0.5) -> dict[str, Any]:
    """Panoptic quality of one image (Kirillov et al. 2019; nucleus form as in HoVer-Net).

    Args:
        true_inst: (H, W) truth instance ids, 0 = background.
        pred_inst: (H, W) predicted instance ids.
        iou_threshold: a pair is a TP when IoU > threshold.

    Returns:
        {"dq", "sq", "pq", "tp", "fp", "fn", "sum_iou"}; NaN ratios when neither side has an object.

    Example:
        >>> r = pq(np.array([[1, 1, 0, 2]]), np.array([[1, 1, 1, 0]]))
        >>> r["tp"], r["fp"], r["fn"], round(r["pq"], 4)  # DQ = 1/(1+0+1/2), SQ = 2/3
        (1, 0, 1, 0.4444)
    """
    o = overlaps(true_inst, pred_inst)
    t, _, iou = _match(o, iou_threshold)
    tp = int(t.size)
    return _pq_from(tp, o.n_pred - tp, o.n_true - tp, float(iou.sum()))


def instance_classes(inst: np.ndarray, class_map: np.ndarray, ignore_index: int | None = 255) -> np.ndarray:
    """Return the class of each relabelled instance by majority vote of `class_map` (foreground only).

    Args:
        inst: (H, W) instance ids (relabelled internally: entry k is relabelled id k).
        class_map: (H, W) class ids; class 0 and `ignore_index` do not vote.

    Returns:
        (n + 1,) int64 array; entry 0 and instances without any foreground vote are 0.
    """
    lab = relabel_contiguous(inst).ravel().astype(np.int64)
    cls = np.asarray(class_map).ravel().astype(np.int64)
    if cls.shape != lab.shape:
        raise InputError(f"class map shape {np.shape(class_map)} != instance map shape {np.shape(inst)}")
    n = int(lab.max(initial=0))
    valid = (lab > 0) & (cls > 0)
    if ignore_index is not None:
        valid &= cls != ignore_index
    if not valid.any():
        return np.zeros(n + 1, dtype=np.int64)
    k = int(cls[valid].max()) + 1
    votes = np.bincount(lab[valid] * k + cls[valid], minlength=(n + 1) * k).reshape(n + 1, k)
    out = votes.argmax(axis=1).astype(np.int64)
    out[votes.sum(axis=1) == 0] = 0
    out[0] = 0
    return out


def _per_class_pq(o: Overlaps, t_cls: np.ndarray, p_cls: np.ndarray, num_classes: int,
                  iou_threshold: float) -> list[dict[str, Any]]:
    out = []
    for c in range(1, num_classes):
        tk = t_cls == c
        pk = p_cls == c
        t, _, iou = _match(o, iou_threshold, tk, pk)
        tp = int(t.size)
        out.append(_pq_from(tp, int(pk[1:].sum()) - tp, int(tk[1:].sum()) - tp, float(iou.sum())))
    return out


def mpq(true_inst: np.ndarray, true_cls: np.ndarray, pred_inst: np.ndarray, pred_cls: np.ndarray,
        num_classes: int, iou_threshold: float = 0.5,
        classes_present: Literal["truth", "either"] = "truth") -> dict[str, Any]:
    """Multi-class PQ of one image, PanNuke style: PQ per foreground class, then the mean.

    Args:
        true_inst, pred_inst: (H, W) instance ids.
        true_cls, pred_cls: (H, W) class maps; each instance takes the majority foreground class.
        num_classes: K including background (classes 1..K-1 are scored).
        iou_threshold: TP when IoU > threshold.
        classes_present: "truth" (PanNuke: classes without truth instances are skipped even when
            predicted) or "either" (a predicted-only class counts with PQ 0).

    Returns:
        {"mpq": mean over the classes present (NaN when none), "n_classes": count,
         "per_class": [pq dict for class 1..K-1]}.
    """
    o = overlaps(true_inst, pred_inst)
    t_cls = instance_classes(true_inst, true_cls)
    p_cls = instance_classes(pred_inst, pred_cls)
    per = _per_class_pq(o, t_cls, p_cls, num_classes, iou_threshold)
    vals = [r["pq"] for r in per
            if (r["tp"] + r["fn"] > 0 if classes_present == "truth" else r["tp"] + r["fp"] + r["fn"] > 0)]
    return {"mpq": float(np.mean(vals)) if vals else float("nan"), "n_classes": len(vals),
            "per_class": per}


class PQAccumulator:
    """Accumulate AJI, PQ and (multi-class) mPQ over images with constant memory.

    Reported figures (`result()`):

    * "aji": mean of per-image AJI over images with objects (MoNuSeg convention), "aji_n" its count;
      "aji_aggregated": sum C / sum U over all images.
    * "pq", "dq", "sq": per-image mean (images without objects on either side skipped);
      "pq_aggregated" etc.: TP, FP, FN and IoU sums added over all images, then the ratios.
    * with `num_classes > 2`: "mpq" (PanNuke: per-image mean of the per-image mPQ) and
      "mpq_aggregated" (per class aggregated PQ, mean over classes with any truth object), plus
      a per-class table.
    """

    def __init__(self, num_classes: int = 2, iou_threshold: float = 0.5,
                 class_names: list[str] | None = None) -> None:
        self.num_classes = int(num_classes)
        self.iou_threshold = iou_threshold
        self.class_names = class_names or [f"class_{c}" for c in range(self.num_classes)]
        self.n_images = 0
        self._sums: dict[str, float] = {k: 0.0 for k in ("aji", "pq", "dq", "sq", "mpq")}
        self._counts: dict[str, int] = {k: 0 for k in ("aji", "pq", "mpq")}
        self._c = self._u = 0
        self._bin = np.zeros(4)  # tp, fp, fn, sum_iou
        self._cls = np.zeros((self.num_classes, 4))

    @property
    def multiclass(self) -> bool:
        """True when there is more than one foreground class."""
        return self.num_classes > 2

    def update(self, true_inst: np.ndarray, pred_inst: np.ndarray, true_cls: np.ndarray | None = None,
               pred_cls: np.ndarray | None = None) -> dict[str, Any]:
        """Add one image; return its own {"aji", "pq", ...} record."""
        o = overlaps(true_inst, pred_inst)
        self.n_images += 1
        c, u = _aji_counts(o)
        self._c += c
        self._u += u
        rec: dict[str, Any] = {"aji": c / u if u else float("nan")}
        if u:
            self._sums["aji"] += c / u
            self._counts["aji"] += 1
        t, _, iou = _match(o, self.iou_threshold)
        tp = int(t.size)
        r = _pq_from(tp, o.n_pred - tp, o.n_true - tp, float(iou.sum()))
        rec.update(r)
        self._bin += (r["tp"], r["fp"], r["fn"], r["sum_iou"])
        if r["tp"] + r["fp"] + r["fn"]:
            for k in ("pq", "dq", "sq"):
                self._sums[k] += r[k]
            self._counts["pq"] += 1
        if self.multiclass and true_cls is not None and pred_cls is not None:
            t_cls = instance_classes(true_inst, true_cls)
            p_cls = instance_classes(pred_inst, pred_cls)
            per = _per_class_pq(o, t_cls, p_cls, self.num_classes, self.iou_threshold)
            vals = []
            for ci, pr in enumerate(per, start=1):
                self._cls[ci] += (pr["tp"], pr["fp"], pr["fn"], pr["sum_iou"])
                if pr["tp"] + pr["fn"] > 0:
                    vals.append(pr["pq"])
            if vals:
                rec["mpq"] = float(np.mean(vals))
                self._sums["mpq"] += rec["mpq"]
                self._counts["mpq"] += 1
        return rec

    def result(self) -> dict[str, Any]:
        """Return the dataset figures (see the class docstring); None where undefined."""
        def mean(k: str, n: str) -> float | None:
            return self._sums[k] / self._counts[n] if self._counts[n] else None

        agg = _pq_from(int(self._bin[0]), int(self._bin[1]), int(self._bin[2]), float(self._bin[3]))
        out: dict[str, Any] = {
            "n_images": self.n_images,
            "aji": mean("aji", "aji"), "aji_n": self._counts["aji"],
            "aji_aggregated": self._c / self._u if self._u else None,
            "pq": mean("pq", "pq"), "dq": mean("dq", "pq"), "sq": mean("sq", "pq"),
            "pq_n": self._counts["pq"],
            "pq_aggregated": _nan_none(agg["pq"]), "dq_aggregated": _nan_none(agg["dq"]),
            "sq_aggregated": _nan_none(agg["sq"]),
            "tp": agg["tp"], "fp": agg["fp"], "fn": agg["fn"],
            "iou_threshold": self.iou_threshold,
        }
        if self.multiclass:
            per = []
            for c in range(1, self.num_classes):
                r = _pq_from(int(self._cls[c, 0]), int(self._cls[c, 1]), int(self._cls[c, 2]),
                             float(self._cls[c, 3]))
                per.append({"id": c, "name": self.class_names[c], "pq": _nan_none(r["pq"]),
                            "dq": _nan_none(r["dq"]), "sq": _nan_none(r["sq"]),
                            "tp": r["tp"], "fp": r["fp"], "fn": r["fn"]})
            vals = [p["pq"] for p in per if p["tp"] + p["fn"] > 0]
            out["mpq"] = mean("mpq", "mpq")
            out["mpq_n"] = self._counts["mpq"]
            out["mpq_aggregated"] = float(np.mean(vals)) if vals else None
            out["per_class"] = per
        out["convention"] = (
            "AJI (Kumar 2017, HoVer-Net get_fast_aji pairing): mean over images with objects, "
            "aji_aggregated = sum C / sum U; PQ: TP when IoU > "
            f"{self.iou_threshold}, DQ = TP/(TP+FP/2+FN/2), SQ = mean IoU of TPs (0 if none); "
            "pq/dq/sq = per-image mean (images with no object on either side skipped), *_aggregated = "
            "TP/FP/FN/IoU summed over images first"
            + ("; mPQ (PanNuke): per image, PQ per class over classes with truth instances, averaged; "
               "mpq = mean over images, mpq_aggregated = per-class aggregated PQ averaged over classes "
               "with truth instances" if self.multiclass else ""))
        return out


def _nan_none(x: float) -> float | None:
    return None if x != x else float(x)
