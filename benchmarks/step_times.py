"""Where a run's wall clock went: median step time, validation checks and their cost, from `metrics.jsonl`.

A validation check's cost is read as the gap between the step it follows and the next step, minus the
median gap between two plain steps (so it includes the checkpoint written with it). Only the last
stage is read (the stage `--snapshot-minutes` and the curves count in).

Example:
    python benchmarks/step_times.py benchmarks/runs/consep/cdal-small-seed0-zen3-curve60
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path
from typing import Any


def step_times(run: Path) -> dict[str, Any]:
    """Return steps, elapsed_s, median_step_s, val_checks, val_s and val_share of the last stage."""
    recs = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    stage = max((r.get("stage_index", 0) for r in recs if r.get("type") == "step"), default=0)
    last = [r for r in recs if r.get("stage_index", 0) == stage]
    steps = {r["step"]: r["elapsed_s"] for r in last if r.get("type") == "step"}
    vals = {r["step"] for r in last if r.get("type") == "val"}
    if len(steps) < 2:
        raise ValueError(f"{run / 'metrics.jsonl'}: fewer than 2 logged steps in the last stage")
    order = sorted(steps)
    plain = [steps[b] - steps[a] for a, b in itertools.pairwise(order) if b == a + 1 and a not in vals]
    median = statistics.median(plain) if plain else float("nan")
    val_s = sum(steps[s + 1] - steps[s] - median for s in vals if s + 1 in steps)
    elapsed = steps[order[-1]]
    checks = sum(1 for s in vals if s + 1 in steps)
    return {"steps": order[-1], "elapsed_s": elapsed, "median_step_s": median, "val_checks": checks,
            "val_s": val_s, "val_share": val_s / elapsed}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path, nargs="+", help="run folders (with metrics.jsonl)")
    args = p.parse_args(argv)
    for run in args.runs:
        if not (run / "metrics.jsonl").is_file():
            print(f"error: {run}: no metrics.jsonl (expected a run folder of `ldiffusion train`)",
                  file=sys.stderr)
            return 2
        try:
            t = step_times(run)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"{run}: {t['steps']} steps in {t['elapsed_s']:.0f} s, median step {t['median_step_s']:.2f} s; "
              f"{t['val_checks']} validation checks took {t['val_s']:.0f} s "
              f"({100 * t['val_share']:.0f} % of the clock)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
