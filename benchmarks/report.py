"""Collect `benchmarks/accuracy.py` result files into one Markdown table per data set and scoring.

    python benchmarks/report.py benchmarks/results/2026-12-03-*.json > tables.md

Every row names its method (with the run's `--tag`), the scoring (split or part, e.g. MoNuSeg
`test` and `test-watershed`, GlaS `testA`), the headline metrics in percent, the validation score
the run selected its weights on, and the measured training and prediction wall times. Rows come
from the files in the order given; nothing is computed here except the formatting.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

COLUMNS: dict[str, list[tuple[str, str]]] = {
    "monuseg": [("dice", "Dice"), ("miou", "IoU"), ("aji", "AJI"), ("pq", "PQ"), ("dq", "DQ"), ("sq", "SQ")],
    "glas": [
        ("dice", "Dice"),
        ("obj_f1", "obj F1"),
        ("obj_dice", "obj Dice"),
        ("obj_hausdorff", "obj Hausdorff px"),
    ],
    "default": [("dice", "DICE"), ("mpa", "MPA"), ("miou", "mIoU"), ("fwiou", "FwIoU")],
}


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "obj_hausdorff":
        return f"{value:.1f}"
    return f"{100 * value:.1f}"


def rows(paths: list[Path]) -> dict[str, list[dict[str, Any]]]:
    """Return data set -> result rows (one per run and scoring) from accuracy JSON files."""
    out: dict[str, list[dict[str, Any]]] = {}
    for path in paths:
        res = json.loads(path.read_text())
        for r in res.get("results", []):
            for scoring, m in r.get("scores", {}).items():
                out.setdefault(r["dataset"], []).append({
                    "method": r["method"] + (f" ({r['tag']})" if r.get("tag") else ""), "scoring": scoring,
                    "metrics": m, "val": r.get("val_score"), "train_s": r.get("train_s"),
                    "predict_s": r.get("predict_s"), "file": path.name})
    return out


def markdown(table: dict[str, list[dict[str, Any]]]) -> str:
    """Render the rows as Markdown tables, one per data set."""
    lines: list[str] = []
    for ds, items in table.items():
        cols = COLUMNS.get(ds, COLUMNS["default"])
        lines += [
            f"### {ds}",
            "",
            "| method | scored on | "
            + " | ".join(f"{c} %" if k != "obj_hausdorff" else c for k, c in cols)
            + " | val score | train min | predict min | file |",
            "|" + "---|" * (len(cols) + 6),
        ]
        for it in items:
            m = it["metrics"]
            if "error" in m:
                lines.append(
                    f"| {it['method']} | {it['scoring']} | error: {m['error']} |" + " |" * (len(cols) + 3)
                )
                continue
            cells = [_cell(k, m.get(k)) for k, _ in cols]
            val = "-" if it["val"] is None else f"{it['val']:.3f}"
            tr = "-" if it["train_s"] is None else f"{it['train_s'] / 60:.1f}"
            pr = "-" if it["predict_s"] is None else f"{it['predict_s'] / 60:.1f}"
            lines.append(f"| {it['method']} | {it['scoring']} | " + " | ".join(cells)
                         + f" | {val} | {tr} | {pr} | {it['file']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the tables of the given result files."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path, help="accuracy.py JSON result files")
    args = p.parse_args(argv)
    print(markdown(rows(args.files)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
