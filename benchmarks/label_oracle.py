"""Block-majority label oracle: the best any model can do that outputs one class per s x s block.

LDSeg encodes the label map into a latent of stride s (`--set latent_stride=s`), so its output can
resolve no finer than an s x s block. This script reduces the *ground truth* of a split to one class
per block (the block's majority), paints it back at full resolution and scores it like a prediction:
foreground Dice over the classes (dataset-level, classes absent from both skipped) and, with
`--contour-px`, GlaS object F1 of the instances rebuilt from the reduced contour target. No model and
no test data are involved: run it on the validation split to choose a stride.

Example:
    python benchmarks/label_oracle.py --data ~/.cache/ldiffusion/data/consep --split val \\
        --strides 4 8 16 --out benchmarks/results/2026-12-05-label-oracle-consep.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ldiffusion.core.io import write_json
from ldiffusion.data.format import read_dataset_info
from ldiffusion.data.targets import contour_target, instances_from_contour
from ldiffusion.eval.glas import object_f1


def block_majority(label: np.ndarray, stride: int, num_classes: int) -> np.ndarray:
    """Return (H, W) `label` with every `stride` x `stride` block set to its most frequent class.

    Blocks past the border are padded with class 0; ties go to the lower class id.
    """
    h, w = label.shape
    hp, wp = -(-h // stride) * stride, -(-w // stride) * stride
    pad = np.zeros((hp, wp), label.dtype)
    pad[:h, :w] = label
    blocks = pad.reshape(hp // stride, stride, wp // stride, stride).transpose(0, 2, 1, 3)
    blocks = blocks.reshape(hp // stride, wp // stride, stride * stride)
    counts = np.stack([(blocks == c).sum(-1) for c in range(num_classes)], -1)
    return np.repeat(np.repeat(counts.argmax(-1), stride, 0), stride, 1)[:h, :w]


def oracle(data: Path, split: str, stride: int, contour_px: int | None) -> dict[str, Any]:
    """Score the block-majority reduction of `split`'s labels at `stride`."""
    info = read_dataset_info(data)
    k = len(info.class_names)
    tp, ps, ts = np.zeros(k), np.zeros(k), np.zeros(k)
    f1s = []
    for i in info.ids(split):
        label = np.array(Image.open(data / "labels" / f"{i}.png")).astype(np.int64)
        if contour_px is not None:
            inst = np.array(Image.open(data / "instances" / f"{i}.png")).astype(np.int64)
            reduced = block_majority(contour_target(label, inst, contour_px, k), stride, k + 1)
            pred_inst, pred = instances_from_contour(reduced, k)
            f1s.append(object_f1(inst, pred_inst)["f1"])
        else:
            pred = block_majority(label, stride, k)
        valid = label != info.ignore_index
        for c in range(1, k):
            tp[c] += ((pred == c) & (label == c) & valid).sum()
            ps[c] += ((pred == c) & valid).sum()
            ts[c] += (label == c).sum()
    dice = {info.class_names[c]: 2 * tp[c] / (ps[c] + ts[c]) for c in range(1, k) if ps[c] + ts[c] > 0}
    out: dict[str, Any] = {"stride": stride, "dice": float(np.mean(list(dice.values()))),
                           "dice_per_class": {c: float(v) for c, v in dice.items()}}
    if f1s:
        out["object_f1"] = float(np.mean(f1s))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="prepared data set folder")
    p.add_argument("--split", default="val", help="split whose labels are reduced (default: val)")
    p.add_argument("--strides", type=int, nargs="+", default=[4, 8, 16], help="block sizes")
    p.add_argument("--contour-px", type=int, default=None,
                   help="also build the contour target of this band width and score object F1 "
                        "(needs instances/)")
    p.add_argument("--out", type=Path, default=None, help="JSON output (printed either way)")
    args = p.parse_args(argv)
    rows = [oracle(args.data, args.split, s, args.contour_px) for s in args.strides]
    res = {"data": str(args.data), "split": args.split, "contour_px": args.contour_px, "rows": rows,
           "command": "python benchmarks/label_oracle.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    for r in rows:
        extra = f", object F1 {100 * r['object_f1']:.1f} %" if "object_f1" in r else ""
        print(f"stride {r['stride']:>2}: foreground Dice {100 * r['dice']:.1f} %{extra}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
