"""End-to-end demo: `python -m ldiffusion.demo --out demo_out` (a few minutes on 2 CPU cores).

1. generates the synthetic H&E-like data set (`data/`);
2. trains the tiny U-Net baseline (`run_unet/`, about a minute) and the tiny L-Diffusion
   (`run_ldiffusion/`: autoencoder -> Laplace diffusion + contrastive loss -> ConvNeXt segmenter);
3. predicts the test split (`predictions_<method>/<id>.png` class maps + `<id>_overlay.png`; L-Diffusion also
   writes `<id>_unc.png` uncertainty maps over 2 noise seeds);
4. evaluates both with `eval.report.evaluate_folder` and writes `metrics.md` (table) and
  `metrics_<method>.txt`;
5. writes `figure1_violins.png`: per class, the distribution of pixel-latent-vector values at each reverse
  step,
   Laplace (the trained model) vs Gaussian (the same autoencoder with a U-Net trained on Gaussian noise
   for the
   same number of steps), on the test tiles.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import time
from pathlib import Path
from typing import Any


def _ensure_registered() -> None:
    from ldiffusion.methods import METHODS
    from ldiffusion.methods.ldiffusion import LDiffusionMethod

    if "ldiffusion" not in METHODS:
        METHODS.register("ldiffusion")(LDiffusionMethod)


def _train(
    method: str,
    data: Path,
    run: Path,
    *,
    overrides: list[str],
    seed: int,
    minutes: float | None,
    progress: bool,
) -> float:
    from ldiffusion.cli.train import run_training

    if run.exists():  # a previous demo: start over, the demo is not resumable
        shutil.rmtree(run)
    t0 = time.monotonic()
    run_training(
        method,
        data,
        run,
        preset="tiny",
        overrides=overrides,
        seed=seed,
        device="cpu",
        max_minutes=minutes,
        progress=progress,
    )
    return time.monotonic() - t0


def _evaluate(pred_dir: Path, data: Path) -> dict[str, Any]:
    try:
        from ldiffusion.eval.report import evaluate_folder
    except ImportError:  # pragma: no cover - eval package missing
        evaluate_folder = None
    if evaluate_folder is not None:
        return evaluate_folder(pred_dir, data, split="test", progress=False)
    import numpy as np
    import torch

    from ldiffusion.data.format import read_dataset_info, read_mask
    from ldiffusion.train.validation import DiceAccumulator

    info = read_dataset_info(data)
    acc = DiceAccumulator(info.num_classes, ignore_index=info.ignore_index)
    for case_id in info.ids("test"):
        pred = torch.from_numpy(read_mask(pred_dir / f"{case_id}.png").astype(np.int64))
        gt = torch.from_numpy(read_mask(data / "labels" / f"{case_id}.png").astype(np.int64))
        acc.update(pred[None], gt[None])
    return {
        "semantic": {
            "per_class": [{"name": n, "dice": d} for n, d in zip(info.class_names, acc.dice(), strict=False)],
            "dice": acc.mean_foreground_dice(),
        }
    }


def _gaussian_twin(method: Any, data: Path, seed: int) -> Any:
    """Copy the trained L-Diffusion, switch its noise to Gaussian and retrain its U-Net from the same init."""
    import torch

    from ldiffusion.data.dataset import SegmentationDataset
    from ldiffusion.data.transforms import TrainTransform
    from ldiffusion.methods import create_method
    from ldiffusion.methods.ldiffusion import LDiffusionMethod

    cfg = method.cfg.replace(noise="gaussian")
    twin = create_method("ldiffusion", cfg, num_classes=method.num_classes)
    assert isinstance(twin, LDiffusionMethod)
    twin.ae = copy.deepcopy(method.ae)
    ds = SegmentationDataset(data, "train", transform=TrainTransform(crop_px=cfg.crop_px), seed=seed)
    opt = torch.optim.Adam(twin.unet.parameters(), lr=cfg.diffusion_lr)
    g_order = torch.Generator().manual_seed(seed)
    bs = cfg.diffusion_batch_size
    for step in range(cfg.diffusion_steps):
        idx = torch.randint(0, len(ds), (bs,), generator=g_order).tolist()
        items = [ds[i] for i in idx]
        batch = {
            "image": torch.stack([x["image"] for x in items]),
            "label": torch.stack([x["label"] for x in items]),
            "id": [x["id"] for x in items],
            "annotated": torch.tensor([x["annotated"] for x in items]),
        }
        loss = twin.training_step(batch, torch.Generator().manual_seed(seed * 1000 + step), "diffusion")[
            "unet"
        ]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return twin.eval()


def _violin_figure(out: Path, laplace: Any, gaussian: Any, data: Path, seed: int) -> Path:
    import numpy as np
    import torch

    from ldiffusion.core.rng import derive_seed
    from ldiffusion.data.dataset import SegmentationDataset
    from ldiffusion.infer.plots import pixel_values_by_class, plot_step_violins

    ds = SegmentationDataset(data, "test")
    d = laplace.size_divisor
    feats: dict[str, list[torch.Tensor]] = {"Laplace": [], "Gaussian": []}
    labels = []
    for i in range(len(ds)):
        s = ds[i]
        h, w = (s["image"].shape[-2] // d) * d, (s["image"].shape[-1] // d) * d
        x = s["image"][None, :, :h, :w]
        seeds = [derive_seed(seed, "figure", s["id"])]
        feats["Laplace"].append(laplace.features(x, seeds))
        feats["Gaussian"].append(gaussian.features(x, seeds))
        labels.append(s["label"][None, :h, :w])
    lab = torch.cat(labels)
    panels = {}
    for name, fs in feats.items():
        panels[f"{name} noise"] = pixel_values_by_class(
            torch.cat(fs), lab, laplace.num_classes, generator=torch.Generator().manual_seed(seed)
        )
    palette = laplace.extra_info.get("palette")
    return plot_step_violins(
        panels,
        out / "figure1_violins.png",
        class_names=laplace.class_names,
        colors=np.array(palette, dtype=np.uint8) if palette else None,
        title="Pixel latent vectors per reverse step (test tiles)",
    )


def run_demo(out: Path, *, minutes: float = 1.0, seed: int = 0, progress: bool = True) -> Path:
    """Run the demo into `out`; return the path of `metrics.md`."""
    from ldiffusion.core.io import atomic_write_bytes
    from ldiffusion.data.synth import make_synthetic_dataset
    from ldiffusion.infer.predict import predict_folder
    from ldiffusion.methods import load_segmenter

    _ensure_registered()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    make_synthetic_dataset(data, n=30, size=96, seed=seed)
    times: dict[str, float] = {}
    results: dict[str, dict[str, Any]] = {}
    runs = {
        "unet": (["steps=400", "val_every=50", "ckpt_every=100"], minutes),
        "ldiffusion": (["seg_steps=250", "val_every=50", "ckpt_every=100"], None),
    }
    methods: dict[str, Any] = {}
    for name, (overrides, budget) in runs.items():
        run = out / f"run_{name}"
        times[name] = _train(
            name, data, run, overrides=overrides, seed=seed, minutes=budget, progress=progress
        )
        seg = load_segmenter(run, "cpu")
        methods[name] = seg
        pred_dir = out / f"predictions_{name}"
        t0 = time.monotonic()
        predict_folder(
            seg,
            pred_dir,
            data_root=data,
            split="test",
            seed=seed,
            progress=progress,
            save_uncertainty=name == "ldiffusion",
            n_samples=2 if name == "ldiffusion" else None,
        )
        times[f"{name}_predict"] = time.monotonic() - t0
        results[name] = _evaluate(pred_dir, data)
        try:
            from ldiffusion.eval.report import format_table

            atomic_write_bytes(out / f"metrics_{name}.txt", format_table(results[name]).encode())
        except ImportError:  # pragma: no cover
            pass
    t0 = time.monotonic()
    gaussian = _gaussian_twin(methods["ldiffusion"], data, seed)
    figure = _violin_figure(out, methods["ldiffusion"], gaussian, data, seed)
    times["figure"] = time.monotonic() - t0

    names = [p["name"] for p in results["unet"]["semantic"]["per_class"]]

    def pct(v: Any) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    lines = [
        "# ldiffusion demo: synthetic H&E-like set, tiny presets, CPU",
        "",
        f"Seed {seed}; test split; Dice in % from `evaluate_folder` (dataset-level confusion matrix; "
        "'-' = class absent from truth and prediction). Mean = the evaluator's mean Dice.",
        "",
        "| class | " + " | ".join(runs) + " |",
        "|---|" + "---|" * len(runs),
    ]
    for i, n in enumerate(names):
        lines.append(
            f"| {n} | " + " | ".join(pct(results[m]["semantic"]["per_class"][i]["dice"]) for m in runs) + " |"
        )
    lines.append(
        "| **mean Dice** | " + " | ".join(f"**{pct(results[m]['semantic']['dice'])}**" for m in runs) + " |"
    )
    lines += ["", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in times.items()]
    lines += [
        "",
        f"Figure: `{figure.name}` (Laplace vs Gaussian, per class and step). Predictions and overlays: "
        "`predictions_<method>/`; L-Diffusion uncertainty over 2 noise seeds: `<id>_unc.png`.",
        "",
    ]
    report = out / "metrics.md"
    atomic_write_bytes(report, "\n".join(lines).encode())
    return report


def main(argv: list[str] | None = None) -> int:
    """Command-line entry of the demo."""
    import logging

    import torch

    p = argparse.ArgumentParser(prog="python -m ldiffusion.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default demo_out)")
    p.add_argument("--minutes", type=float, default=1.0, help="U-Net baseline training budget in minutes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: fastest on a busy 2-core machine; 0 = torch default)",
    )
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    t0 = time.monotonic()
    report = run_demo(args.out, minutes=args.minutes, seed=args.seed, progress=not args.no_progress)
    print(report.read_text())  # noqa: T201
    done = (f"demo finished in {time.monotonic() - t0:.0f} s; outputs in {args.out}/: data/, run_unet/, "
            "run_ldiffusion/, predictions_*/ (<id>.png, <id>_overlay.png), metrics.md, figure1_violins.png")
    print(done)  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
