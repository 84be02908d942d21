"""Score a whole-slide prediction of the stitched MoNuSeg test slide against the per-image truth.

`benchmarks/make_monuseg_slide.py` writes `monuseg_test_slide.tif` and the placement JSON of the
14 test images; `ldiffusion slide predict RUN monuseg_test_slide.tif --out OUT` writes
`OUT/monuseg_test_slide/labels.ome.tif`. This script cuts each image's window out of level 0 of
that label map and scores it with the project's evaluator (dataset-level confusion matrix,
foreground only; AJI and PQ from connected components), exactly as `ldiffusion evaluate` scores
per-image predictions:

    python benchmarks/score_monuseg_slide.py --labels OUT/monuseg_test_slide/labels.ome.tif \\
        --placement slides/monuseg_test_slide.json --data data/monuseg --out slide_scores.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    """Cut, write and score the per-image windows; print and write the headline metrics."""
    import tifffile

    from ldiffusion.data.format import write_png
    from ldiffusion.eval.report import evaluate_folder

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--labels", type=Path, required=True, help="labels.ome.tif of `slide predict`")
    p.add_argument("--placement", type=Path, required=True, help="monuseg_test_slide.json")
    p.add_argument("--data", type=Path, required=True, help="prepared MoNuSeg data set (truth)")
    p.add_argument("--out", type=Path, required=True, help="JSON output")
    args = p.parse_args(argv)
    placement = json.loads(args.placement.read_text())["images"]
    labels = tifffile.imread(args.labels, level=0)
    labels = labels.reshape(labels.shape[-2:]) if labels.ndim > 2 else labels
    with tempfile.TemporaryDirectory() as tmp:
        pred = Path(tmp)
        for case_id, box in placement.items():
            window = labels[box["y"]:box["y"] + box["h"], box["x"]:box["x"] + box["w"]]
            write_png(pred / f"{case_id}.png", np.ascontiguousarray(window.astype(np.uint8)))
        res = evaluate_folder(pred, args.data, split="test", foreground_only=True, instances=True,
                              progress=False)
    sem, ins = res["semantic"], res.get("instance", {})
    out = {"labels": str(args.labels), "n_images": res.get("n_images"), "dice": sem.get("dice"),
           "miou": sem.get("miou"), "aji": ins.get("aji"), "pq": ins.get("pq"),
           "convention": res.get("convention")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
