"""Learning curves: test scores against training minutes, from `benchmarks/accuracy.py` result files.

Each result row is one point: a snapshot row (`--snapshot-minutes`) at its snapshot time, a full row
at the run's `--max-minutes` budget. `--max-minutes` caps each training stage, so a method of several
stages (L-Diffusion: autoencoder, diffusion, segmenter) is placed at N x the budget with
`--stages ldiffusion=3`. Runs whose tags differ only in a trailing `curve`, `curve<M>`, `curve-<M>` or
stage split (`-5-5-20`) share one line (`line_tag`); `--by-method` joins all runs of a method into one
line whatever their tags. A run without
`--max-minutes` whose stages have their own budgets (`--set ldiffusion:ae_max_minutes=4` and the
like) is placed at the sum of those budgets. A snapshot row (taken in the last stage) is placed at
the earlier stages' budgets plus its snapshot minutes. One panel per metric, one figure per call (one
data set).

Example:
    python benchmarks/plot_curves.py benchmarks/results/2026-12-05-consep-*-curve.json \\
        --split test --metrics dice --title "CoNSeP test" --out docs/img/curve_consep.svg
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

LABELS = {"dice": "Dice %", "miou": "mIoU %", "aji": "AJI %", "pq": "PQ %", "obj_f1": "object F1 %",
          "obj_dice": "object Dice %"}


# The budget key of each multi-stage method's last stage, the stage that `--snapshot-minutes` counts in.
LAST_STAGE_BUDGET = {"ldiffusion": "seg_max_minutes"}


def _stage_budgets(res: dict[str, Any], method: str) -> dict[str, float]:
    """Return {key: minutes} of the run's per-stage budgets (`--set METHOD:<stage>_max_minutes=M`)."""
    return {k.split(":", 1)[1]: float(v) for k, _, v in (o.partition("=") for o in res.get("overrides", []))
            if k.startswith(f"{method}:") and k.endswith("_max_minutes")}


def _max_minutes(res: dict[str, Any]) -> float | None:
    """Return the run's `--max-minutes` (the budget of each training stage), or None."""
    if res.get("max_minutes") is not None:
        return float(res["max_minutes"])
    found = re.search(r"--max-minutes (\S+)", res.get("command", ""))
    return float(found.group(1)) if found else None


def _budget_minutes(res: dict[str, Any], entry: dict[str, Any],
                    stages: dict[str, int] | None = None) -> float | None:
    """Return the training minutes at which a result row sits on the curve, or None when unknown.

    A full row sits at its budget: `--max-minutes` x the method's number of stages (`stages`), or the sum of
    its per-stage budgets. A snapshot row was taken `snapshot_minutes` into the last stage, so it sits at
    the earlier stages' budgets plus that.
    """
    method = entry.get("method", "")
    n_stages = (stages or {}).get(method, 1)
    per_stage, max_minutes = _stage_budgets(res, method), _max_minutes(res)
    snapshot = entry.get("snapshot_minutes")
    if snapshot is not None:
        last_key = LAST_STAGE_BUDGET.get(method)
        if per_stage and last_key in per_stage:
            return float(snapshot) + sum(per_stage.values()) - per_stage[last_key]
        return float(snapshot) + (n_stages - 1) * (max_minutes or 0.0)
    if max_minutes is not None:
        return max_minutes * n_stages
    return sum(per_stage.values()) if per_stage else None


def line_tag(tag: str) -> str:
    """The line a run's tag belongs to: the tag without a trailing `curve`, `curve<M>`, `curve-<M>` and
    `-<number>` groups (a budget or stage split), e.g. "nostain-segimg-5-5-20" -> "nostain-segimg"."""
    return re.sub(r"(-?curve[0-9.]*)?(-[0-9.]+)*$", "", tag)


def points(files: list[Path], split: str, metric: str, stages: dict[str, int] | None = None,
           by_method: bool = False) -> dict[str, list[tuple[float, float]]]:
    """Return {line label: [(minutes, score %), ...] sorted by minutes} over the result files.

    `stages` maps a method to its number of budgeted stages (full rows are placed at that many times
    the per-stage `--max-minutes`; snapshot rows, taken in the last stage, add the earlier stages' budgets).
    """
    lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for f in files:
        res = json.loads(f.read_text())
        for e in res.get("results", []):
            score = e.get("scores", {}).get(split, {}).get(metric)
            minutes = _budget_minutes(res, e, stages)
            if score is None or minutes is None:
                continue
            tag = "" if by_method else line_tag(e.get("tag") or "")
            label = e["method"] + (f" ({tag})" if tag else "")
            lines[label].append((minutes, 100.0 * score))
    return {k: sorted(v) for k, v in sorted(lines.items())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", type=Path, nargs="+", help="accuracy.py result JSON files")
    p.add_argument("--split", default="test", help="scored split or part (test, testA, ...)")
    p.add_argument("--metrics", nargs="+", default=["dice"], choices=sorted(LABELS), help="one panel each")
    p.add_argument("--title", default="", help="figure title")
    p.add_argument("--stages", nargs="+", default=[], metavar="METHOD=N",
                   help="budgeted training stages of a method (e.g. ldiffusion=3): its full rows are placed "
                        "at N x --max-minutes")
    p.add_argument("--by-method", action="store_true", help="one line per method, whatever the runs' tags")
    p.add_argument("--out", type=Path, required=True, help="image file (.svg or .png)")
    args = p.parse_args(argv)
    stages: dict[str, int] = {}
    for item in args.stages:
        method, _, n = item.partition("=")
        if not n.isdigit() or int(n) < 1:
            p.error(f"--stages {item!r}: expected METHOD=N with N a positive integer")
        stages[method] = int(n)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.metrics), figsize=(4.2 * len(args.metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], args.metrics, strict=True):
        for label, pts in points(args.files, args.split, metric, stages, args.by_method).items():
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", label=label)
            print(f"{metric} {label}: " + ", ".join(f"{x:g} min {y:.1f}" for x, y in pts))
        ax.set_xlabel("training minutes (one thread)")
        ax.set_ylabel(LABELS[metric])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, metadata={"Date": None} if args.out.suffix == ".svg" else None)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
