"""Choose an inference-time setting of a trained model on its validation split (never on test).

Some keys change only how a trained model predicts: the draws a diffusion method averages
(`n_samples`, LDSeg's `mean_map`), cDAL's chains, the object size filter of a contour model
(`min_object_px`), test-time flips and rotations (`predict --tta`). This script predicts the
validation split once per candidate setting into a temporary folder (deleted afterwards; nothing is
written into the run folder), scores each with `evaluate`'s own scoring (`eval.report.
evaluate_folder`, foreground classes only) and writes the scores and the choice as JSON. Candidates
are tried in the order given, and the choice is the first one whose score is within `--tolerance` of
the best, so list the cheapest setting first.

Metrics: `dice` (the dataset-level DICE over the foreground classes, `evaluate`'s headline), `obj_f1`
(GlaS object F1, per-image mean; GlaS data sets only) or `aji` (per-image mean; data sets with
instance maps).

Example:
    python benchmarks/choose_predict_set.py --run benchmarks/runs/glas/ldseg-small-seed0 \\
        --data ~/.cache/ldiffusion/data/glas --fixed min_object_px=2000 \\
        --candidate none --candidate n_samples=4,mean_map=softmax --candidate n_samples=8,mean_map=softmax \\
        --out benchmarks/results/glas-ldseg-n-samples-val.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ldiffusion.core.errors import LDiffusionError
from ldiffusion.core.io import write_json
from ldiffusion.eval.report import evaluate_folder
from ldiffusion.infer.predict import predict_folder
from ldiffusion.methods import load_segmenter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import headline  # a sibling script: the headline numbers of an evaluate result

METRICS = ("dice", "obj_f1", "aji")


def parse_candidate(text: str) -> list[str]:
    """`"none"` -> []; `"a=1,tta"` -> ["a=1", "tta"] (each item KEY=VALUE, or `tta`: predict with --tta)."""
    if text.strip().lower() == "none":
        return []
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t != "tta" and ("=" not in t or t.startswith("="))]
    if not items or bad:
        raise ValueError(f"--candidate {text!r}: expected 'none' or KEY=VALUE[,KEY=VALUE...][,tta]")
    return items


def choose(scores: list[float | None], tolerance: float) -> int:
    """Index of the first candidate within `tolerance` of the best defined score.

    Example:
        >>> choose([0.70, 0.75, 0.752], 0.003)
        1
    """
    defined = [s for s in scores if s is not None]
    if not defined:
        raise ValueError("no candidate has a defined score")
    best = max(defined)
    return next(i for i, s in enumerate(scores) if s is not None and s >= best - tolerance)


def _score_candidates(args: argparse.Namespace, candidates: list[list[str]]) -> list[dict[str, Any]]:
    """Predict the split once per candidate (into a temporary folder) and score it; one row per candidate."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="choose-predict-set-") as tmp:
        for i, cand in enumerate(candidates):
            overrides = [*args.fixed, *(kv for kv in cand if kv != "tta")]
            segmenter: Any = load_segmenter(args.run, args.device, overrides)
            pred = Path(tmp) / f"cand{i}"
            t0 = time.perf_counter()
            predict_folder(segmenter, pred, data_root=args.data, split=args.split, seed=args.seed,
                           batch_size=args.batch_size, progress=False, tta="tta" in cand)
            predict_s = time.perf_counter() - t0
            result = evaluate_folder(pred, args.data, split=args.split, foreground_only=True,
                                     instances=args.metric == "aji", progress=False)
            scores = headline(result)  # fractions; obj_f1 / aji only where evaluate computed them
            score = scores.get(args.metric)
            rows.append({"candidate": cand, "overrides": overrides, "score": score, "predict_s": predict_s,
                         "dice": scores["dice"], "obj_f1": scores.get("obj_f1")})
            shown = "undefined" if score is None else f"{100 * score:.2f} %"
            print(f"{' '.join(cand) or 'none':<40} {args.metric} {shown}  (predict {predict_s:.0f} s)",
                  flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="finished run folder")
    p.add_argument("--data", type=Path, required=True, help="prepared data set")
    p.add_argument("--split", default="val", help="split to choose on (default: val; never a test split)")
    p.add_argument("--candidate", action="append", required=True, metavar="none|KEY=VALUE[,...][,tta]",
                   help="one setting to try (repeatable, cheapest first); 'none' = the run's own config; "
                        "'tta' = predict with test-time flips and rotations")
    p.add_argument("--fixed", action="append", default=[], metavar="KEY=VALUE",
                   help="inference change applied to every candidate (repeatable), e.g. min_object_px=2000")
    p.add_argument("--metric", choices=METRICS, default="dice")
    p.add_argument("--tolerance", type=float, default=0.003,
                   help="a candidate within this of the best score counts as tied (fraction; default 0.003)")
    p.add_argument("--seed", type=int, default=0, help="prediction seed (as `predict --seed`)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None, help="JSON output (printed either way)")
    args = p.parse_args(argv)
    if args.split.lower().startswith("test"):
        print(f"error: --split {args.split}: choose on the validation split; the test split is read once, "
              "by evaluate", file=sys.stderr)
        return 2
    try:
        candidates = [parse_candidate(c) for c in args.candidate]
        if any("=" not in kv or kv.startswith("=") for kv in args.fixed):
            raise ValueError(f"--fixed {args.fixed}: expected KEY=VALUE items")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out is not None and args.out.exists():
        print(f"error: --out {args.out}: exists; refusing to overwrite it", file=sys.stderr)
        return 2
    try:
        rows = _score_candidates(args, candidates)
    except LDiffusionError as exc:  # a bad run folder, data set or key: one line, exit code 2
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        chosen = choose([r["score"] for r in rows], args.tolerance)
    except ValueError:
        print(f"error: metric {args.metric!r} is undefined for every candidate on {args.data} "
              f"split {args.split}", file=sys.stderr)
        return 2
    flags = " ".join([f"--predict-set {kv}" for kv in rows[chosen]["overrides"]]
                     + (["--tta"] if "tta" in rows[chosen]["candidate"] else []))
    print(f"chosen: {' '.join(rows[chosen]['candidate']) or 'none'}  ({flags or 'no --predict-set'})")
    res = {"run": str(args.run), "data": str(args.data), "split": args.split, "metric": args.metric,
           "tolerance": args.tolerance, "seed": args.seed, "fixed": args.fixed, "scores": rows,
           "chosen": rows[chosen]["candidate"], "predict_set": flags,
           "command": "python benchmarks/choose_predict_set.py "
                      + " ".join(sys.argv[1:] if argv is None else argv)}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, res)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
