"""Choose the object post-processing of a contour model on its validation predictions (never on test).

A contour model (`--set target=contour`) builds objects by a marker-controlled watershed; fragments
of interior or boundary pixels become small false objects. This script predicts the validation split
once (probabilities kept), rebuilds the instances for each candidate size and scores them against the
validation instance maps: GlaS object F1 (`--metric obj_f1`) or AJI (`--metric aji`). The choice is
the smallest size whose score is within `--tolerance` of the best (small objects are real objects on
unseen slides, so ties go to keeping them). Predict the test split with the choice:
`ldiffusion predict RUN ... --set min_object_px=N`, or `benchmarks/accuracy.py --predict-set
min_object_px=N`.

With `--thresholds` and `--erosions` the markers of the watershed are re-drawn too
(`data.targets.redraw_markers`: `marker_threshold`, `marker_erosion_px`), and the grid of all three
keys is scored. Among the settings within `--tolerance` of the best, the choice is the one that changes
least: the smallest size, then the smallest erosion, then the arg-max markers before the lowest
threshold. The script prints the `--predict-set` flags of the choice.

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
from ldiffusion.data.targets import instances_from_contour, redraw_markers
from ldiffusion.eval.glas import object_f1
from ldiffusion.eval.instance import aji
from ldiffusion.infer.predict import predict_folder
from ldiffusion.methods import load_segmenter


def score(metric: str, true_inst: np.ndarray, pred_inst: np.ndarray) -> float:
    """Object F1 (GlaS criterion) or AJI of one image."""
    if metric == "obj_f1":
        return float(object_f1(true_inst, pred_inst)["f1"])
    return float(aji(true_inst, pred_inst))


Setting = tuple[int, float | None, int]  # (min_object_px, marker_threshold, marker_erosion_px)


def sweep(prob_dir: Path, data: Path, split: str, settings: list[Setting],
          metric: str) -> dict[Setting, float]:
    """Mean validation score per post-processing setting, from the saved probabilities in `prob_dir`."""
    info = read_dataset_info(data)
    per: dict[Setting, list[float]] = {s: [] for s in settings}
    sizes_per_marker: dict[tuple[float | None, int], list[int]] = {}
    for size, t, e in settings:
        sizes_per_marker.setdefault((t, e), []).append(size)
    for case in info.ids(split):
        true_path = data / "instances" / f"{case}.png"
        if not true_path.is_file():
            continue  # no outlines for this image
        truth = read_mask(true_path).astype(np.int64)
        prob = np.load(prob_dir / f"{case}_prob.npy").astype(np.float32)
        for (t, e), sizes in sizes_per_marker.items():
            class_map = redraw_markers(prob, marker_threshold=t, marker_erosion_px=e)
            for size in sizes:
                inst, _ = instances_from_contour(class_map, prob.shape[0] - 1, min_size=size)
                per[(size, t, e)].append(score(metric, truth, inst))
    if not per[settings[0]]:
        raise SystemExit(f"error: no image of split {split!r} of {data} has an instance map")
    return {s: float(np.nanmean(v)) if not np.isnan(v).all() else 0.0 for s, v in per.items()}


def _change_order(s: Setting) -> tuple[int, int, float]:
    """Sort key: the setting that changes least first (size, then erosion, then threshold)."""
    return (s[0], s[2], -1.0 if s[1] is None else s[1])


def choose(scores: dict[Any, float], tolerance: float) -> Any:
    """The setting that changes least among those within `tolerance` of the best.

    Keys are sizes (int) or (size, threshold, erosion) settings.
    """
    best = max(scores.values())
    near = [s for s, v in scores.items() if v >= best - tolerance]
    return min(near, key=lambda s: _change_order(s) if isinstance(s, tuple) else (s, 0, -1.0))


def predict_set_flags(setting: Setting) -> str:
    """The `--predict-set` flags of `benchmarks/accuracy.py` for a setting."""
    size, t, e = setting
    flags = [f"min_object_px={size}"] + ([f"marker_threshold={t}"] if t is not None else []) \
        + ([f"marker_erosion_px={e}"] if e else [])
    return " ".join(f"--predict-set {f}" for f in flags)


def _threshold(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="run folder of a target=contour model")
    p.add_argument("--data", type=Path, required=True, help="prepared data set (with instances/)")
    p.add_argument("--split", default="val", help="split to choose on (default: val)")
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 100, 250, 500, 1000, 2000, 4000])
    p.add_argument("--thresholds", type=_threshold, nargs="+", default=[None],
                   help="marker_threshold values to try; 'none' = the arg-max markers (default: none only)")
    p.add_argument("--erosions", type=int, nargs="+", default=[0],
                   help="marker_erosion_px values to try, px of the files' resolution (default: 0 only)")
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
    settings = [(size, t, e) for size in sorted(set(args.sizes)) for t in dict.fromkeys(args.thresholds)
                for e in sorted(set(args.erosions))]
    scores = sweep(prob_dir, args.data, args.split, settings, args.metric)
    chosen = choose(scores, args.tolerance)
    for s in sorted(scores, key=_change_order):
        print(f"min_object_px {s[0]:>5}  marker_threshold {s[1]!s:>4}  marker_erosion_px {s[2]:>2}: "
              f"{args.metric} {100 * scores[s]:.1f} %{'  <- chosen' if s == chosen else ''}")
    print(f"chosen: {predict_set_flags(chosen)}")
    res = {"run": str(args.run), "data": str(args.data), "split": args.split, "metric": args.metric,
           "tolerance": args.tolerance,
           "scores": [{"min_object_px": s[0], "marker_threshold": s[1], "marker_erosion_px": s[2],
                       "score": v} for s, v in scores.items()],
           "chosen": {"min_object_px": chosen[0], "marker_threshold": chosen[1],
                      "marker_erosion_px": chosen[2]},
           "predict_set": predict_set_flags(chosen),
           "command": "python benchmarks/choose_min_object.py "
                      + " ".join(sys.argv[1:] if argv is None else argv)}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
