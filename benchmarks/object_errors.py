"""Where a contour model's objects go wrong, per validation image: merges (recall) or fragments (precision).

Reads the validation probabilities that `benchmarks/choose_min_object.py` saved in `RUN/pred-val-prob`
(run that first), rebuilds the instances as `predict` does (`data.targets.instances_from_contour`) and
prints, per image with an instance map, the true and predicted object counts and the GlaS object
F1 with its precision and recall. Two marker variants can be tried on the same probabilities, to see
whether post-processing could repair merges: `--interior-threshold P` takes markers where the
interior probability exceeds P (instead of the arg-max), `--erode R` erodes the markers by a disc of
radius R px. Validation only: the test split is read once, by `ldiffusion evaluate`.

Example:
    python benchmarks/object_errors.py --run benchmarks/runs/glas/unet-small-seed0-contour-b6-curve \\
        --data ~/.cache/ldiffusion/data/glas --min-object-px 1000 \\
        --out benchmarks/results/glas-object-errors.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from ldiffusion.core.io import write_json
from ldiffusion.data.format import read_dataset_info, read_mask
from ldiffusion.data.targets import instances_from_contour, redraw_markers
from ldiffusion.eval.glas import object_f1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="contour model run folder with pred-val-prob/")
    p.add_argument("--data", type=Path, required=True, help="prepared data set (with instances/)")
    p.add_argument("--min-object-px", type=int, default=10)
    p.add_argument("--interior-threshold", type=float, default=None)
    p.add_argument("--erode", type=int, default=0, help="marker erosion radius in px")
    p.add_argument("--out", type=Path, default=None, help="JSON output (printed either way)")
    args = p.parse_args(argv)
    prob_dir = args.run / "pred-val-prob"
    if not prob_dir.is_dir():
        raise SystemExit(f"error: {prob_dir} does not exist; run benchmarks/choose_min_object.py first")
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
        rows.append({"image": case, "true_objects": int(len(np.unique(truth)) - 1),
                     "pred_objects": int(inst.max()), "f1": float(r["f1"]),
                     "precision": float(r["precision"]), "recall": float(r["recall"])})
        print(f"{case:>10}: true {rows[-1]['true_objects']:>3}  predicted {rows[-1]['pred_objects']:>3}  "
              f"F1 {r['f1']:.2f}  precision {r['precision']:.2f}  recall {r['recall']:.2f}")
    if not rows:
        raise SystemExit(f"error: no validation image of {args.data} has an instance map")
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("f1", "precision", "recall")}
    print(f"mean: F1 {mean['f1']:.3f}  precision {mean['precision']:.3f}  recall {mean['recall']:.3f}")
    if args.out is not None:
        write_json(args.out, {"run": str(args.run), "min_object_px": args.min_object_px,
                              "interior_threshold": args.interior_threshold, "erode": args.erode,
                              "images": rows, "mean": mean,
                              "command": "python benchmarks/object_errors.py "
                                         + " ".join(sys.argv[1:] if argv is None else argv)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
