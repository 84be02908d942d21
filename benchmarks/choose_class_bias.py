"""Choose a model's per-class decision offsets `class_bias` on its validation predictions (never on test).

A model trained with class weights (cDAL `small`: inverse pixel frequencies clipped at 100) learns to
over-predict the rare classes; one trained without them can under-predict them. Adding an offset b_c to
each class's log-probability before the arg-max moves the decision without retraining
(`methods.sliding.apply_class_bias`). This script predicts the validation split once (probabilities
kept), then fits b (background fixed at 0) by coordinate ascent over a grid, maximising the
dataset-level mean Dice over all classes, background included (`--objective all`, the default). The mean
foreground Dice alone (`--objective foreground`: the score `evaluate` and the training's validation
report) cannot see background pixels given to a class the split hardly has, and on an LDSeg model it
chose an offset that turned the background into that class (docs/results.md, 2026-12-07); the script
prints both scores and every class's Dice, background included, before and after.

Offsets fitted on a small validation split can overfit it: the script reports the validation score
before and after, and the test split is predicted once with the choice:
`ldiffusion predict RUN ... --set class_bias=[...]`, or `benchmarks/accuracy.py --reuse-runs
--predict-set class_bias=[...]`. Inference-time keys given with `--set` (e.g. LDSeg's `mean_map=softmax`:
the mean of soft maps instead of one-hot masks, whose log-probabilities with one sample are 0 or
log 1e-6, beyond the grid's reach) apply to the validation prediction and must be given again to the
test prediction; the script prints both.

Example:
    python benchmarks/choose_class_bias.py --run benchmarks/runs/consep/cdal-small-seed0-r18-d4-curve90 \\
        --data ~/.cache/ldiffusion/data/consep --out benchmarks/results/2026-12-06-consep-cdal-class-bias.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ldiffusion.core.io import write_json
from ldiffusion.data.format import read_dataset_info, read_mask
from ldiffusion.eval.semantic import semantic_scores
from ldiffusion.infer.predict import predict_folder
from ldiffusion.methods import load_segmenter


def load_split(prob_dir: Path, data: Path, split: str, ignore_index: int,
               stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Log-probabilities (K, N) float32 and truth (N,) int64 of every labelled pixel of the split.

    `stride` keeps every stride-th pixel along each axis (1 = all) to bound the memory.
    """
    info = read_dataset_info(data)
    logs, truths = [], []
    for case in info.ids(split):
        prob = np.load(prob_dir / f"{case}_prob.npy").astype(np.float32)[:, ::stride, ::stride]
        truth = read_mask(data / "labels" / f"{case}.png").astype(np.int64)[::stride, ::stride]
        keep = truth != ignore_index
        logs.append(np.log(prob[:, keep] + 1e-6))
        truths.append(truth[keep])
    return np.concatenate(logs, 1), np.concatenate(truths)


def foreground_dice(log_prob: np.ndarray, truth: np.ndarray, bias: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean foreground Dice and per-class Dice (K,), background first (NaN where undefined), of the
    arg-max of `log_prob + bias`, from one confusion matrix with `evaluate`'s convention
    (`semantic_scores`)."""
    k = log_prob.shape[0]
    pred = np.argmax(log_prob + bias[:, None], 0)
    cm = np.bincount(truth * k + pred, minlength=k * k).reshape(k, k)
    scores = semantic_scores(cm, foreground_only=True)
    dice = np.array([np.nan if c["dice"] is None else c["dice"] for c in scores["per_class"]])
    return float(scores["dice"] or 0.0), dice


def objective(log_prob: np.ndarray, truth: np.ndarray, bias: np.ndarray, name: str) -> float:
    """The score `fit_bias` maximises: "all" = mean Dice over every class defined, background included;
    "foreground" = the mean foreground Dice of `evaluate`.

    "foreground" is blind to pixels moved from the background to a class the split has almost no truth
    pixels of: that changes no other foreground class's Dice but can lift this class's own from 0, so an
    offset can flood the image with it. "all" counts the background's loss.
    """
    fg, dice = foreground_dice(log_prob, truth, bias)
    if name == "foreground":
        return fg
    if name != "all":
        raise ValueError(f"objective={name!r}; expected 'all' or 'foreground'")
    return float(np.nanmean(dice))


def fit_bias(log_prob: np.ndarray, truth: np.ndarray, grid: np.ndarray, rounds: int,
             objective_name: str = "all") -> np.ndarray:
    """Coordinate ascent over `grid` for classes 1..K-1 (class 0 stays at 0); ties keep the current value."""
    bias = np.zeros(log_prob.shape[0], np.float32)
    best = objective(log_prob, truth, bias, objective_name)
    for _ in range(rounds):
        changed = False
        for c in range(1, len(bias)):
            for g in grid:
                trial = bias.copy()
                trial[c] = g
                score = objective(log_prob, truth, trial, objective_name)
                if score > best + 1e-6:
                    best, bias, changed = score, trial, True
        if not changed:
            break
    return bias


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="run folder of a trained model")
    p.add_argument("--data", type=Path, required=True, help="prepared data set")
    p.add_argument("--split", default="val", help="split to choose on (default: val)")
    p.add_argument("--grid", type=float, nargs=3, default=[-6.0, 6.0, 0.25], metavar=("LO", "HI", "STEP"),
                   help="offsets tried per class (default: -6 to 6 in steps of 0.25)")
    p.add_argument("--rounds", type=int, default=3, help="coordinate-ascent passes over the classes")
    p.add_argument("--objective", choices=["all", "foreground"], default="all",
                   help="maximise the mean Dice over all classes, background included (default), or the mean "
                        "foreground Dice alone (the script's rule before 2026-12-07; it can flood the "
                        "background with a rare class)")
    p.add_argument("--stride", type=int, default=1, help="score every stride-th pixel per axis (1 = all)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="inference-time config change, repeatable (e.g. LDSeg's mean_map=softmax: "
                        "soft maps instead of one-hot masks); give it again to the test prediction")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None, help="JSON output (printed either way)")
    args = p.parse_args(argv)
    if args.split.startswith("test"):
        raise SystemExit("error: choose on the validation split; the test split is read once, by evaluate")
    segmenter: Any = load_segmenter(args.run, args.device, overrides=[*args.overrides, "class_bias=null"])
    suffix = "".join(f"-{o}".replace("/", "_") for o in args.overrides)  # other settings kept apart
    prob_dir = args.run / f"pred-{args.split}-prob{suffix}"
    predict_folder(segmenter, prob_dir, data_root=args.data, split=args.split, save_prob=True, progress=False)
    info = read_dataset_info(args.data)
    log_prob, truth = load_split(prob_dir, args.data, args.split, info.ignore_index, args.stride)
    lo, hi, step = args.grid
    grid = np.round(np.arange(lo, hi + step / 2, step), 6)
    bias = fit_bias(log_prob, truth, grid, args.rounds, args.objective)
    before, dice_before = foreground_dice(log_prob, truth, np.zeros_like(bias))
    after, dice_after = foreground_dice(log_prob, truth, bias)
    names = info.class_names
    for c, name in enumerate(names):
        print(f"{name:<20} bias {bias[c]:+.2f}  "
              f"Dice {100 * dice_before[c]:5.1f} -> {100 * dice_after[c]:5.1f} %")
    flag = "class_bias=[" + ",".join(f"{b:g}" for b in bias.tolist()) + "]"
    flags = " ".join(f"--predict-set {o}" for o in [*args.overrides, flag])
    print(f"{args.split} mean foreground Dice {100 * before:.1f} -> {100 * after:.1f} % (objective "
          f"{args.objective}); chosen: {flags}")
    res = {"run": str(args.run), "data": str(args.data), "split": args.split, "classes": names,
           "objective": args.objective,
           "class_bias": [float(b) for b in bias], "score_before": before, "score_after": after,
           "dice_before": [None if np.isnan(d) else float(d) for d in dice_before],
           "dice_after": [None if np.isnan(d) else float(d) for d in dice_after],
           "overrides": args.overrides, "predict_set": flags,
           "command": "python benchmarks/choose_class_bias.py "
                      + " ".join(sys.argv[1:] if argv is None else argv)}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
