"""Learning curves: test scores against training minutes or crops seen, from `accuracy.py` result files.

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

`--x crops` places each row at the training crops its weights saw in the last stage (steps x batch
size) instead: two methods level at equal crops but apart at equal minutes differ in speed, not in what
they learn from a crop. `--x steps` places it at the last stage's optimiser steps (methods with
different batch sizes differ there).

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


def _batch_override(res: dict[str, Any], method: str) -> int | None:
    """Return the run's `--set [METHOD:]batch_size=N`, or None (the method-specific one wins)."""
    found: int | None = None
    for key, _, value in (o.partition("=") for o in res.get("overrides", [])):
        if key == f"{method}:batch_size" or (key == "batch_size" and found is None):
            found = int(value)
    return found


def crops_seen(res: dict[str, Any], entry: dict[str, Any],
               batch_sizes: dict[str, int] | None = None) -> int | None:
    """Return the training crops a result row's weights saw in their last stage, or None when unknown.

    The row's own `crops` (written by `accuracy.py` since 2026-12-07), else its `steps` x its
    `batch_size`; rows of older files carry `steps` on snapshot rows only and no batch size, so their
    batch size is the run's `--set batch_size=N` override, else `batch_sizes[method]` (the preset's).
    """
    if entry.get("crops") is not None:
        return int(entry["crops"])
    steps, method = entry.get("steps"), entry.get("method", "")
    batch = entry.get("batch_size")
    if batch is None:
        batch = _batch_override(res, method)
    if batch is None:
        batch = (batch_sizes or {}).get(method)
    return None if steps is None or batch is None else int(steps) * int(batch)


def points(files: list[Path], split: str, metric: str, stages: dict[str, int] | None = None,
           by_method: bool = False, x: str = "minutes", batch_sizes: dict[str, int] | None = None,
           skipped: list[str] | None = None) -> dict[str, list[tuple[float, float]]]:
    """Return {line label: [(x, score %), ...] sorted by x} over the result files.

    `x` = "minutes": `stages` maps a method to its number of budgeted stages (full rows are placed at
    that many times the per-stage `--max-minutes`; snapshot rows, taken in the last stage, add the
    earlier stages' budgets). `x` = "crops": each row sits at `crops_seen` (thousands of crops); `x` =
    "steps": at its last stage's optimiser steps (thousands). Rows with a score but no known count are
    left out and named in `skipped`.
    """
    lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for f in files:
        res = json.loads(f.read_text())
        for e in res.get("results", []):
            score = e.get("scores", {}).get(split, {}).get(metric)
            if score is None:
                continue
            if x in ("crops", "steps"):
                count = crops_seen(res, e, batch_sizes) if x == "crops" else e.get("steps")
                where = _budget_minutes(res, e, stages)
                if count is None and skipped is not None:
                    at = "?" if where is None else f"{where:g}"
                    skipped.append(f"{f.name}: {e.get('method')} at {at} min")
                pos = None if count is None else count / 1000.0
            else:
                pos = _budget_minutes(res, e, stages)
            if pos is None:
                continue
            tag = "" if by_method else line_tag(e.get("tag") or "")
            label = e["method"] + (f" ({tag})" if tag else "")
            lines[label].append((pos, 100.0 * score))
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
    p.add_argument("--x", choices=["minutes", "crops", "steps"], default="minutes",
                   help="horizontal axis: training minutes (the budget), thousands of training crops seen "
                        "in the last stage (steps x batch size), which tells learning per crop from crops "
                        "per minute, or thousands of optimiser steps of the last stage")
    p.add_argument("--batch-size", nargs="+", default=[], metavar="METHOD=N",
                   help="with --x crops: a method's training batch size, for result rows that carry steps "
                        "but no batch size (files written before 2026-12-07) and no --set batch_size")
    p.add_argument("--out", type=Path, required=True, help="image file (.svg or .png)")
    args = p.parse_args(argv)

    def per_method(flag: str, items: list[str]) -> dict[str, int]:
        """Parse METHOD=N values of `flag` (N a positive integer); a bad one ends with exit code 2."""
        out: dict[str, int] = {}
        for item in items:
            method, _, n = item.partition("=")
            if not n.isdigit() or int(n) < 1:
                p.error(f"{flag} {item!r}: expected METHOD=N with N a positive integer")
            out[method] = int(n)
        return out

    stages = per_method("--stages", args.stages)
    batch_sizes = per_method("--batch-size", args.batch_size)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.metrics), figsize=(4.2 * len(args.metrics), 3.4), squeeze=False)
    unit = {"crops": "k crops", "steps": "k steps"}.get(args.x, "min")
    for ax, metric in zip(axes[0], args.metrics, strict=True):
        skipped: list[str] = []
        for label, pts in points(args.files, args.split, metric, stages, args.by_method, args.x, batch_sizes,
                                 skipped).items():
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", label=label)
            print(f"{metric} {label}: " + ", ".join(f"{x:g} {unit} {y:.1f}" for x, y in pts))
        for item in skipped:
            print(f"{metric}: left out (no step count or batch size): {item}")
        ax.set_xlabel({"crops": "thousands of training crops seen", "steps": "thousands of optimiser steps"}
                      .get(args.x, "training minutes (one thread)"))
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
