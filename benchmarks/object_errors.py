"""Where a contour model's objects go wrong, per validation image: merges, splits, misses, extra objects.

Reads the validation probabilities that `benchmarks/choose_min_object.py` saved in `RUN/pred-val-prob`
(run that first), rebuilds the instances as `predict` does (`data.targets.redraw_markers` and
`instances_from_contour`) and prints, per image with an instance map, the true and predicted object
counts, the GlaS object F1 (IoU > 0.5) with its precision and recall, and why each unmatched true
object failed (`truth_errors`):

* merged: one predicted object covers over half of it and reaches into another true object;
* split: two or more predicted objects each cover over 10 % of it, none over half;
* missed: predicted objects cover under 20 % of it;
* shape: the rest (one predicted object, but its outline is off: IoU <= 0.5).

With `--grades CSV` (GlaS's `Grade.csv`: columns name, patient ID, grade) each image gets its grade
and the means are also given per grade; GlaS's testB is mostly malignant, so the malignant validation
images are the closest validation proxy for it. `--interior-threshold` / `--erode` re-draw the markers
(the `marker_threshold` / `marker_erosion_px` keys) to see whether post-processing could repair
merges. Validation only: the test split is read once, by `ldiffusion evaluate`.

Example:
    python benchmarks/object_errors.py --run benchmarks/runs/glas/unet-small-seed0-contour-b6-curve \\
        --data ~/.cache/ldiffusion/data/glas --min-object-px 1000 --grades ../shared/data/glas/Grade.csv \\
        --out benchmarks/results/glas-object-errors.json
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ldiffusion.core.io import write_json
from ldiffusion.data.format import read_dataset_info, read_mask
from ldiffusion.data.targets import instances_from_contour, redraw_markers
from ldiffusion.eval.glas import object_f1

ERRORS = ("merged", "split", "missed", "shape")


def truth_errors(truth: np.ndarray, pred: np.ndarray) -> dict[str, int]:
    """Count the true objects of one image that no predicted object matches (IoU > 0.5), by cause.

    Args:
        truth, pred: (H, W) instance maps (0 = background).

    Returns:
        {"matched", "merged", "split", "missed", "shape"}: counts of true objects (module docstring).

    Example:
        >>> t = np.array([[1, 1, 0, 2, 2]]); truth_errors(t, np.array([[1, 1, 1, 1, 1]]))["merged"]
        2
    """
    out = dict.fromkeys(("matched", *ERRORS), 0)
    pred_area = np.bincount(pred.ravel())
    for i in np.unique(truth):
        if i == 0:
            continue
        inside = truth == i
        area = int(inside.sum())
        ids, counts = np.unique(pred[inside], return_counts=True)
        cover = {int(p): int(c) for p, c in zip(ids, counts, strict=True) if p}
        if not cover:
            out["missed"] += 1
            continue
        best = max(cover, key=cover.__getitem__)
        inter = cover[best]
        if inter / (area + pred_area[best] - inter) > 0.5:
            out["matched"] += 1
        elif inter > 0.5 * area:
            reaches = bool(((truth > 0) & (truth != i) & (pred == best)).any())
            out["merged" if reaches else "shape"] += 1
        elif sum(c > 0.1 * area for c in cover.values()) >= 2:
            out["split"] += 1
        elif sum(cover.values()) < 0.2 * area:
            out["missed"] += 1
        else:
            out["shape"] += 1
    return out


def read_grades(path: Path) -> dict[str, str]:
    """Map image name -> grade from a GlaS `Grade.csv` (name, patient ID, grade, ...)."""
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows or len(rows[0]) < 3:
        raise SystemExit(f"error: {path}: expected a header of at least 3 columns: name, patient ID, grade")
    return {r[0].strip(): r[2].strip() for r in rows[1:] if len(r) >= 3}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean F1 / precision / recall and summed error counts of some image rows."""
    out: dict[str, Any] = {k: float(np.nanmean([r[k] for r in rows])) for k in ("f1", "precision", "recall")}
    out["images"] = len(rows)
    for k in ("true_objects", "pred_objects", "matched", *ERRORS):
        out[k] = int(sum(r[k] for r in rows))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="contour model run folder with pred-val-prob/")
    p.add_argument("--data", type=Path, required=True, help="prepared data set (with instances/)")
    p.add_argument("--min-object-px", type=int, default=10)
    p.add_argument("--interior-threshold", type=float, default=None)
    p.add_argument("--erode", type=int, default=0, help="marker erosion radius in px")
    p.add_argument("--grades", type=Path, default=None, help="GlaS Grade.csv: means per grade too")
    p.add_argument("--out", type=Path, default=None, help="JSON output (printed either way)")
    args = p.parse_args(argv)
    prob_dir = args.run / "pred-val-prob"
    if not prob_dir.is_dir():
        raise SystemExit(f"error: {prob_dir} does not exist; run benchmarks/choose_min_object.py first")
    grades = read_grades(args.grades) if args.grades is not None else {}
    info = read_dataset_info(args.data)
    rows = []
    for case in info.ids("val"):
        true_path = args.data / "instances" / f"{case}.png"
        if not true_path.is_file():
            continue
        truth = read_mask(true_path).astype(np.int64)
        prob = np.load(prob_dir / f"{case}_prob.npy").astype(np.float32)
        if prob.shape[0] != 3:
            raise SystemExit(f"error: {prob_dir / f'{case}_prob.npy'}: expected 3 contour classes, "
                             f"got {prob.shape[0]}")
        cm = redraw_markers(prob, marker_threshold=args.interior_threshold, marker_erosion_px=args.erode)
        inst, _ = instances_from_contour(cm, 2, min_size=args.min_object_px)
        r = object_f1(truth, inst)
        rows.append({"image": case, "grade": grades.get(case), "true_objects": int(len(np.unique(truth)) - 1),
                     "pred_objects": int(inst.max()), "f1": float(r["f1"]),
                     "precision": float(r["precision"]), "recall": float(r["recall"]),
                     **truth_errors(truth, inst)})
        row = rows[-1]
        print(f"{case:>10} {row['grade'] or '':>9}: true {row['true_objects']:>3}  predicted "
              f"{row['pred_objects']:>3}  F1 {r['f1']:.2f}  precision {r['precision']:.2f}  "
              f"recall {r['recall']:.2f}  " + "  ".join(f"{k} {row[k]}" for k in ERRORS))
    if not rows:
        raise SystemExit(f"error: no validation image of {args.data} has an instance map")
    groups = {"all": rows, **{g: [r for r in rows if r["grade"] == g]
                              for g in sorted({r["grade"] for r in rows if r["grade"]})}}
    means = {g: summarise(rs) for g, rs in groups.items()}
    for g, m in means.items():
        print(f"mean ({g}, {m['images']} images): F1 {m['f1']:.3f}  precision {m['precision']:.3f}  recall "
              f"{m['recall']:.3f}; true objects {m['true_objects']}: matched {m['matched']}, "
              + ", ".join(f"{k} {m[k]}" for k in ERRORS))
    if args.out is not None:
        write_json(args.out, {"run": str(args.run), "min_object_px": args.min_object_px,
                              "interior_threshold": args.interior_threshold, "erode": args.erode,
                              "images": rows, "mean": means["all"], "mean_per_grade": means,
                              "command": "python benchmarks/object_errors.py "
                                         + " ".join(sys.argv[1:] if argv is None else argv)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
