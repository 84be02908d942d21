"""End-to-end demo: `python -m ldiffusion.demo --out demo_out` (about 1-2 minutes on 2 CPU cores).

Generates the synthetic H&E-like data set, trains the tiny U-Net baseline for about a minute,
predicts the test split and writes `metrics.md` (per-class Dice of the test split, dataset-level)
plus class maps and overlays into the output folder.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def run_demo(out: Path, *, minutes: float = 1.0, seed: int = 0, progress: bool = True) -> Path:
    """Run the demo into `out`; return the path of `metrics.md`."""
    import numpy as np
    import torch

    from ldiffusion.cli.train import run_training
    from ldiffusion.data.format import read_dataset_info, read_mask
    from ldiffusion.data.synth import make_synthetic_dataset
    from ldiffusion.infer.predict import predict_folder
    from ldiffusion.methods import load_segmenter
    from ldiffusion.train.validation import DiceAccumulator

    data = out / "data"
    make_synthetic_dataset(data, n=30, size=96, seed=seed)
    run = out / "run"
    if (run / "train_state.pt").exists():  # a previous demo: start over, the demo is not resumable
        import shutil

        shutil.rmtree(run)
    t0 = time.monotonic()
    run_training("unet", data, run, preset="tiny", overrides=["steps=400", "val_every=50", "ckpt_every=100"],
                 seed=seed, device="cpu", max_minutes=minutes, progress=progress)
    t_train = time.monotonic() - t0
    segmenter = load_segmenter(run, "cpu")
    pred_dir = out / "predictions"
    ids = predict_folder(segmenter, pred_dir, data_root=data, split="test", seed=seed, progress=progress)
    info = read_dataset_info(data)
    acc = DiceAccumulator(info.num_classes, ignore_index=info.ignore_index)
    for case_id in ids:
        pred = torch.from_numpy(read_mask(pred_dir / f"{case_id}.png").astype(np.int64))
        gt = torch.from_numpy(read_mask(data / "labels" / f"{case_id}.png").astype(np.int64))
        acc.update(pred[None], gt[None])
    dice = acc.dice()
    lines = ["# ldiffusion demo: tiny U-Net on the synthetic set", "",
             f"Training: {t_train:.0f} s on CPU (budget {minutes} min), seed {seed}; "
             f"{len(ids)} test images; Dice is dataset-level (pixels pooled), NaN = class absent.", "",
             "| class | Dice |", "|---|---|"]
    lines += [f"| {name} | {d:.3f} |" for name, d in zip(info.class_names, dice)]
    lines += [f"| **mean foreground** | **{acc.mean_foreground_dice():.3f}** |", ""]
    report = out / "metrics.md"
    from ldiffusion.core.io import atomic_write_bytes

    atomic_write_bytes(report, "\n".join(lines).encode())
    return report


def main(argv: list[str] | None = None) -> int:
    """Command-line entry of the demo."""
    import logging

    p = argparse.ArgumentParser(prog="python -m ldiffusion.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default demo_out)")
    p.add_argument("--minutes", type=float, default=1.0, help="training budget in minutes (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    t0 = time.monotonic()
    report = run_demo(args.out, minutes=args.minutes, seed=args.seed, progress=not args.no_progress)
    print(report.read_text())  # noqa: T201
    print(f"demo finished in {time.monotonic() - t0:.0f} s; outputs in {args.out}/: data/ (synthetic set), "  # noqa: T201
          f"run/ (model.safetensors, metrics.jsonl), predictions/ (<id>.png, <id>_overlay.png), metrics.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
