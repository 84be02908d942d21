"""Choose `min_object_px` of a contour model on its validation predictions (never on the test split).

A contour model (`--set target=contour`) builds objects by a marker-controlled watershed; fragments
of interior or boundary pixels become small false objects. This script predicts the validation split
once (probabilities kept), rebuilds the instances for each candidate size and scores them against the
validation instance maps: GlaS object F1 (`--metric obj_f1`) or AJI (`--metric aji`). The choice is
the smallest size whose score is within `--tolerance` of the best (small objects are real objects on
unseen slides, so ties go to keeping them). Predict the test split with the choice:
`ldiffusion predict RUN ... --set min_object_px=N`, or `benchmarks/accuracy.py --predict-set
min_object_px=N`.

Example:
    python benchmarks/choose_min_object.py --run benchmarks/runs/glas/unet-small-seed0-contour-b6-curve \\
        --data ~/.cache/ldiffusion/data/glas --out benchmarks/results/2026-12-05-glas-unet-min-object.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ldiffusion.core.io import write_json
from ldiffusion.data.format import read_dataset_info, read_mask
from ldiffusion.data.targets import instances_from_contour
from ldiffusion.eval.glas import object_f1
from ldiffusion.eval.instance import aji
from ldiffusion.infer.predict import predict_folder
from ldiffusion.methods import load_segmenter


def score(metric: str, true_inst: np.ndarray, pred_inst: np.ndarray) -> float:
    """Object F1 (GlaS criterion) or AJI of one image."""
    if metric == "obj_f1":
        return float(object_f1(true_inst, pred_inst)["f1"])
    return float(aji(true_inst, pred_inst))


def sweep(prob_dir: Path, data: Path, split: str, sizes: list[int], metric: str) -> dict[int, float]:
    """Mean validation score per candidate size, from the saved probabilities in `prob_dir`."""
    info = read_dataset_info(data)
    per_size: dict[int, list[float]] = {s: [] for s in sizes}
    for case in info.ids(split):
        true_path = data / "instances" / f"{case}.png"
        if not true_path.is_file():
            continue  # no outlines for this image
        truth = read_mask(true_path).astype(np.int64)
        prob = np.load(prob_dir / f"{case}_prob.npy").astype(np.float32)
        class_map = prob.argmax(0).astype(np.int64)
        for s in sizes:
            inst, _ = instances_from_contour(class_map, prob.shape[0] - 1, min_size=s)
            per_size[s].append(score(metric, truth, inst))
    if not per_size[sizes[0]]:
        raise SystemExit(f"error: no image of split {split!r} of {data} has an instance map")
    return {s: float(np.nanmean(v)) if not np.isnan(v).all() else 0.0 for s, v in per_size.items()}


def choose(scores: dict[int, float], tolerance: float) -> int:
    """The smallest size whose score is within `tolerance` of the best."""
    best = max(scores.values())
    return min(s for s, v in scores.items() if v >= best - tolerance)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="run folder of a target=contour model")
    p.add_argument("--data", type=Path, required=True, help="prepared data set (with instances/)")
    p.add_argument("--split", default="val", help="split to choose on (default: val)")
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 100, 250, 500, 1000, 2000, 4000])
    p.add_argument("--metric", choices=["obj_f1", "aji"], default="obj_f1")
    p.add_argument("--tolerance", type=float, default=0.01)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None, help="JSON output (printed either way)")
    args = p.parse_args(argv)
    if args.split == "test":
        raise SystemExit("error: choose on the validation split; the test split is read once, by evaluate")
    segmenter: Any = load_segmenter(args.run, args.device)
    if getattr(segmenter.cfg, "target", "semantic") != "contour":
        raise SystemExit(f"error: {args.run} was not trained with target=contour")
    prob_dir = args.run / f"pred-{args.split}-prob"
    predict_folder(segmenter, prob_dir, data_root=args.data, split=args.split, save_prob=True, progress=False)
    scores = sweep(prob_dir, args.data, args.split, sorted(set(args.sizes)), args.metric)
    chosen = choose(scores, args.tolerance)
    for s, v in scores.items():
        print(f"min_object_px {s:>5}: {args.metric} {100 * v:.1f} %{'  <- chosen' if s == chosen else ''}")
    res = {"run": str(args.run), "data": str(args.data), "split": args.split, "metric": args.metric,
           "tolerance": args.tolerance, "scores": {str(k): v for k, v in scores.items()}, "chosen": chosen,
           "command": "python benchmarks/choose_min_object.py "
                      + " ".join(sys.argv[1:] if argv is None else argv)}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
