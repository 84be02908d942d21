"""Score nucleus models on nuclei from another source: predict a second data set and evaluate it `--binary`.

A model trained on one nucleus set (MoNuSeg: TCGA slides of many organs) meets slides from other labs,
scanners and organs. This script predicts a prepared data set from another source (CoNSeP: colorectal
tissue from one hospital, four nucleus types) with each run folder, merges the set's nucleus types into
one foreground class (`ldiffusion evaluate --binary`) and reports the nucleus Dice, dataset-level and
per image, for each split given. Nothing of the other set is used in training or model selection; pick
settings on its validation split, if at all, and read its test split once.

Example:
    python benchmarks/cross_source.py \\
        --run base=benchmarks/runs/monuseg/unet-small-seed0-semantic-scale0.5-curve90/snapshots/20min \\
        --data ~/.cache/ldiffusion/data/consep --splits val test --threads 1 \\
        --out benchmarks/results/2026-12-06-cross-source-monuseg-to-consep.json
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ldiffusion.core.io import atomic_write_bytes, read_json, write_json

REPO = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], threads: int | None) -> None:
    """Run `ldiffusion ARGS` (this interpreter), raising on a non-zero exit."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-c", "from ldiffusion.cli import entry; entry()", *args]
    print("$ ldiffusion " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, env=env)


def score(name: str, run: Path, data: Path, split: str, work: Path, threads: int | None,
          stain_ref: Path | None = None) -> dict[str, Any]:
    """Predict `split` of `data` with `run` into `work` and evaluate it with `--binary`.

    `stain_ref` predicts with `--stain-normalize stain_ref` (the row's name should say so).
    """
    pred = work / f"{name}-{split}"
    metrics = work / f"{name}-{split}.json"
    t0 = time.perf_counter()
    norm = ["--stain-normalize", str(stain_ref)] if stain_ref is not None else []
    run_cli(["predict", str(run), "--data", str(data), "--split", split, "--out", str(pred),
             "--no-progress", *norm], threads)
    run_cli(["evaluate", "--pred", str(pred), "--data", str(data), "--split", split, "--binary",
             "--foreground-only", "--out", str(metrics), "--no-progress"], threads)
    res = read_json(metrics)
    sem = res["semantic"]
    return {"name": name, "run": str(run), "split": split, "n_images": res["n_images"],
            "nucleus_dice": sem["dice"], "nucleus_iou": sem["miou"], "nucleus_recall": sem["mpa"],
            "per_image_dice": res["per_image_mean"]["dice"], "wall_s": round(time.perf_counter() - t0, 1),
            "stain_normalize": str(stain_ref) if stain_ref is not None else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="append", required=True, metavar="NAME=RUN",
                   help="a named run folder (or snapshot folder) to score (repeatable)")
    p.add_argument("--data", type=Path, required=True, help="prepared data set from the other source")
    p.add_argument("--splits", nargs="+", default=["val", "test"])
    p.add_argument("--work", type=Path, default=REPO / "benchmarks" / "runs" / "cross-source",
                   help="folder for the predictions and metric files (not in git)")
    p.add_argument("--threads", type=int, default=None, help="OMP threads of every command")
    p.add_argument("--stain-normalize", type=Path, default=None, metavar="REF",
                   help="predict with `--stain-normalize REF` (e.g. the training data set of the runs); "
                        "name the runs so that the rows say it")
    p.add_argument("--out", type=Path, required=True, help="result JSON (a .md table is written beside it)")
    args = p.parse_args(argv)
    runs = []
    for item in args.run:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"error: --run {item!r}: expected NAME=RUN")
        runs.append((name, Path(path)))
    args.work.mkdir(parents=True, exist_ok=True)
    rows = [score(name, run, args.data, split, args.work, args.threads, args.stain_normalize)
            for name, run in runs for split in args.splits]
    res = {"schema": 1, "data": str(args.data), "splits": args.splits, "rows": rows,
           "command": "python benchmarks/cross_source.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    lines = ["| model | split | images | nucleus Dice % | per-image Dice % | recall % |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['split']} | {r['n_images']} | {100 * r['nucleus_dice']:.1f} | "
              f"{100 * r['per_image_dice']:.1f} | {100 * r['nucleus_recall']:.1f} |" for r in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, res)
    atomic_write_bytes(args.out.with_suffix(".md"), ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
