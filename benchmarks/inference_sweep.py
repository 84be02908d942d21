"""Inference sweep: one trained run, one config key varied at prediction time, each value scored on test.

For every value V this runs the commands a user would type (printed before they run):

    ldiffusion predict RUN --data DATA --split test --out RUN/pred-test-<key><V> --set <key>=<V> ...
    ldiffusion evaluate --pred RUN/pred-test-<key><V> --data DATA --split test --out ...json <flags>

and reports the headline metrics with the prediction wall time and tiles/s. Example (the LDSeg
number of DDIM steps; `ddim_steps` counts grid points, so K = k + 1 for k denoiser evaluations):

    python benchmarks/inference_sweep.py --run runs/monuseg/ldseg-small-seed0 --data data/monuseg \\
        --key ddim_steps --values 2 3 6 11 --eval-flags="--foreground-only --instances" \\
        --out benchmarks/results/ldseg-ddim-steps.json

Writes `--out` (JSON) and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import Runner, _git_commit, _pct, _write, headline


def main(argv: list[str] | None = None) -> int:
    """Run the sweep; return 0 when every command succeeded."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="trained run folder")
    p.add_argument("--data", type=Path, required=True, help="prepared data set")
    p.add_argument("--split", default="test", help="split to predict and score (default test)")
    p.add_argument("--key", required=True, help="config key varied at prediction time (predict --set)")
    p.add_argument("--values", nargs="+", required=True, help="values of --key")
    p.add_argument("--eval-flags", default="--foreground-only", help="evaluate flags (one string)")
    p.add_argument("--predict-args", default="", help="extra predict arguments (one string)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="OMP threads of every command")
    p.add_argument("--out", type=Path, required=True, help="JSON output (.md beside it)")
    args = p.parse_args(argv)
    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    run = Runner(dry=False)
    rows: list[dict[str, Any]] = []
    failed = False
    for value in args.values:
        pred = args.run / f"pred-{args.split}-{args.key}{value}"
        cmd = ["predict", str(args.run), "--data", str(args.data), "--split", args.split, "--out", str(pred),
               "--set", f"{args.key}={value}", "--seed", str(args.seed), "--device", args.device,
               "--no-progress", *shlex.split(args.predict_args)]
        t0 = time.perf_counter()
        rec = run(cmd)
        wall = time.perf_counter() - t0
        row: dict[str, Any] = {"value": value, "predict_s": round(wall, 1), "commands": [rec]}
        rows.append(row)
        if rec.get("error"):
            failed, row["error"] = True, rec["error"]
            continue
        metrics = args.run / f"metrics-{args.split}-{args.key}{value}.json"
        rec = run(["evaluate", "--pred", str(pred), "--data", str(args.data), "--split", args.split,
                   "--out", str(metrics), *shlex.split(args.eval_flags), "--no-progress"])
        row["commands"].append(rec)
        if rec.get("error"):
            failed, row["error"] = True, rec["error"]
            continue
        row["scores"] = headline(json.loads(metrics.read_text()))
        n_images = row["scores"].get("n_images")
        row["images_per_s"] = round(n_images / wall, 4) if n_images else None
    res = {
        "date": datetime.date.today().isoformat(),
        "run": str(args.run),
        "data": str(args.data),
        "split": args.split,
        "key": args.key,
        "git_commit": _git_commit(),
        "command": "python benchmarks/inference_sweep.py "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "rows": rows,
    }
    lines = [
        f"# Inference sweep over `{args.key}`",
        "",
        f"- run `{args.run}`, {args.split} split of `{args.data}`",
        f"- command: `{res['command']}`",
        "",
        f"| {args.key} | Dice % | mIoU % | AJI % | PQ % | predict s | images/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r.get("scores", {})
        lines.append(
            f"| {r['value']} | {_pct(m.get('dice'))} | {_pct(m.get('miou'))} | {_pct(m.get('aji'))} | "
            f"{_pct(m.get('pq'))} | {r['predict_s']} | {r.get('images_per_s', '-')} |"
        )
    md = "\n".join(lines) + "\n"
    _write(args.out, json.dumps(res, indent=1) + "\n")
    _write(args.out.with_suffix(".md"), md)
    print(md)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
