"""Active learning experiment: choose the next tiles to label by uncertainty, or at random.

On a prepared data set (e.g. MoNuSeg from `ldiffusion data prepare monuseg`), each seed starts from
`--initial` (20%) of the training tiles labelled, drawn at random with the seed. Then for
`--rounds` rounds, `--add` (10%) more training tiles are labelled, chosen either

- **uncertainty**: the unlabelled training images with the highest mean per-pixel entropy of the
  predicted class probabilities (normalised by log K; the model of the previous round, sliding
  window over the whole image; only images are read, never their labels), or
- **random**: drawn at random (seeded),

and the model is trained again from scratch on the labelled tiles with the same method, preset
and budget (`--steps` optimiser steps per stage and/or `--max-minutes` per stage). Round 0 is the
same for both strategies, so it is trained once per seed. Training selects its weights on the
validation split (the `fit` loop); validation and test Dice (foreground classes, dataset-level,
`ldiffusion evaluate` convention) are reported per round; the test split is never used for any
choice.

A round's training set is a derived data set folder under `--work`: a `dataset.json` whose train
split is the labelled subset, beside symbolic links to the source's `images/`, `labels/` (and
`instances/`) folders, trained with `ldiffusion.cli.train.run_training` (the `ldiffusion train`
entry point).

    python benchmarks/active_learning.py --data ~/.cache/ldiffusion/data/monuseg --method unet \\
        --preset small --steps 2000 --seeds 0 1 2 --rounds 3 --out results/al-monuseg.json

Writes `--out` (JSON: every run, the per-round means and standard deviations over seeds, and the
verdict) and a Markdown table beside it (`.md`), and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

STRATEGIES = ("uncertainty", "random")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", type=Path, required=True, help="prepared data set folder (dataset.json)")
    p.add_argument("--method", default="unet", help="method name (default unet)")
    p.add_argument("--preset", default="tiny", help="method preset (default tiny)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps of every stage, every round")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget per stage, every round")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--rounds", type=int, default=3, help="acquisition rounds after the initial one")
    p.add_argument("--initial", type=float, default=0.2, help="share of training tiles labelled at first")
    p.add_argument("--add", type=float, default=0.1, help="share of training tiles added per round")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    p.add_argument(
        "--tile-px", type=int, default=None, help="sliding-window tile for prediction (method crop)"
    )
    p.add_argument("--batch-size", type=int, default=8, help="tiles per forward pass when predicting")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument(
        "--work", type=Path, default=None, help="runs and derived data sets (default: beside --out)"
    )
    p.add_argument(
        "--out", type=Path, default=Path("active_learning.json"), help="JSON result (.md beside it)"
    )
    p.add_argument("--keep", action="store_true", help="keep the run folders (default: weights are deleted)")
    return p.parse_args(argv)


def budget_overrides(method: str, steps: int | None) -> list[str]:
    """`key=value` overrides giving every stage of `method` exactly `steps` optimiser steps."""
    if steps is None:
        return []
    from ldiffusion.methods import METHODS

    cls = METHODS.get(method)
    fields = {f.name for f in dataclasses.fields(cls.config_cls)}
    out = []
    for key in cls.stage_step_keys:
        out.append(f"{key}={steps}")
        epochs = key[: -len("steps")] + "epochs"
        if epochs in fields:
            out.append(f"{epochs}=null")
    return out


def derived_dataset(src: Path, dst: Path, labelled: list[str]) -> Path:
    """Write `dst/dataset.json` with train = `labelled` and symlinks to `src`'s image folders."""
    from ldiffusion.data.format import read_dataset_info, write_dataset_info

    info = read_dataset_info(src)
    dst.mkdir(parents=True, exist_ok=True)
    for sub in ("images", "labels", "instances"):
        if (src / sub).is_dir() and not (dst / sub).exists():
            os.symlink((src / sub).resolve(), dst / sub, target_is_directory=True)
    splits = {**info.splits, "train": sorted(labelled)}
    kept = {i for ids in splits.values() for i in ids}
    parts = {k: v for k, v in info.parts.items() if set(v) <= kept}
    groups = {k: v for k, v in info.groups.items() if k in kept}
    write_dataset_info(dst, dataclasses.replace(info, splits=splits, parts=parts, groups=groups))
    return dst


def evaluate_split(segmenter: Any, data: Path, split: str, pred_dir: Path, args: argparse.Namespace) -> float:
    """Predict `split` into `pred_dir` and return the foreground Dice (dataset level)."""
    from ldiffusion.eval.report import evaluate_folder
    from ldiffusion.infer.predict import predict_folder

    predict_folder(
        segmenter,
        pred_dir,
        data_root=data,
        split=split,
        tile_px=args.tile_px,
        batch_size=args.batch_size,
        seed=0,
        progress=False,
    )
    res = evaluate_folder(pred_dir, data, split=split, foreground_only=True, progress=False)
    return float(res["semantic"]["dice"]) if res["semantic"]["dice"] is not None else float("nan")


def uncertainty_scores(
    segmenter: Any, data: Path, ids: list[str], args: argparse.Namespace
) -> dict[str, float]:
    """Mean normalised entropy of the predicted probabilities of each image (labels never read)."""
    import torch

    from ldiffusion.core.rng import derive_seed, make_generator
    from ldiffusion.data.dataset import sample_path
    from ldiffusion.data.format import read_image
    from ldiffusion.infer.predict import predict_image
    from ldiffusion.infer.suggest import normalised_entropy

    out = {}
    for i in ids:
        path = sample_path(data, "images", i)
        if path is None:
            raise SystemExit(f"{data}/images/{i}.png: not found")
        gen = make_generator(derive_seed(0, i), segmenter.device)
        probs = predict_image(
            segmenter, read_image(path), tile_px=args.tile_px, batch_size=args.batch_size, generator=gen
        )
        out[i] = float(normalised_entropy(probs[None].to(torch.float32)).mean())
    return out


def train_and_score(data: Path, run: Path, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train one round from scratch on `data`, then score val and test."""
    from ldiffusion.cli.train import run_training
    from ldiffusion.core.device import resolve_device
    from ldiffusion.methods import load_segmenter

    if run.exists():
        shutil.rmtree(run)
    t0 = time.perf_counter()
    fit = run_training(
        args.method,
        data,
        run,
        preset=args.preset,
        device=args.device,
        seed=seed,
        max_minutes=args.max_minutes,
        overrides=[*budget_overrides(args.method, args.steps), *args.overrides],
        progress=False,
    )
    seconds = time.perf_counter() - t0
    seg = load_segmenter(run, resolve_device(args.device))
    val = evaluate_split(seg, data, "val", run / "pred-val", args)
    test = evaluate_split(seg, data, "test", run / "pred-test", args)
    return {
        "segmenter": seg,
        "val_dice": val,
        "test_dice": test,
        "train_seconds": round(seconds, 1),
        "best_val_score": fit.best_score,
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    v = [x for x in values if not math.isnan(x)]
    if not v:
        return float("nan"), float("nan")
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def run_experiment(args: argparse.Namespace) -> dict[str, Any]:
    """Run every seed x strategy x round; return the result dictionary."""
    import torch

    from ldiffusion.data.format import read_dataset_info

    if args.threads:
        torch.set_num_threads(args.threads)
    info = read_dataset_info(args.data)
    if not info.splits.get("val") or not info.splits.get("test"):
        raise SystemExit(f"{args.data}: needs val and test splits (model selection on val, report on test)")
    pool = sorted(info.ids("train"))
    n = len(pool)
    k0 = max(1, round(args.initial * n))
    k_add = max(1, round(args.add * n))
    if k0 + args.rounds * k_add > n:
        raise SystemExit(f"{n} training tiles cannot hold {k0} + {args.rounds} x {k_add} labelled ones")
    work = args.work or args.out.with_suffix("").with_name(args.out.stem + "-work")
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        rng = np.random.default_rng(seed)
        initial = sorted(pool[i] for i in rng.choice(n, size=k0, replace=False))
        base = work / f"seed{seed}"
        data0 = derived_dataset(args.data, base / "round0" / "data", initial)
        print(f"seed {seed} round 0: {len(initial)} of {n} training tiles labelled", flush=True)
        r0 = train_and_score(data0, base / "round0" / "run", seed, args)
        for strategy in args.strategies:
            labelled, model, res = list(initial), r0["segmenter"], r0
            runs.append(_record(seed, strategy, 0, labelled, res))
            for r in range(1, args.rounds + 1):
                rest = [i for i in pool if i not in set(labelled)]
                if strategy == "uncertainty":
                    scores = uncertainty_scores(model, args.data, rest, args)
                    order = sorted(rest, key=lambda i: (-scores[i], i))
                    chosen = order[:k_add]
                else:
                    pick = np.random.default_rng([seed, r, 7]).choice(len(rest), size=k_add, replace=False)
                    chosen = sorted(rest[j] for j in pick)
                labelled = sorted([*labelled, *chosen])
                d = derived_dataset(args.data, base / strategy / f"round{r}" / "data", labelled)
                res = train_and_score(d, base / strategy / f"round{r}" / "run", seed, args)
                model = res["segmenter"]
                runs.append(_record(seed, strategy, r, labelled, res, chosen))
                print(
                    f"seed {seed} {strategy} round {r}: {len(labelled)} labelled, val Dice "
                    f"{res['val_dice']:.4f}, test Dice {res['test_dice']:.4f}",
                    flush=True,
                )
        if not args.keep:
            for p in base.rglob("model.safetensors"):
                p.unlink()
    return summarise(args, info.name, n, k0, k_add, runs)


def _record(
    seed: int,
    strategy: str,
    r: int,
    labelled: list[str],
    res: dict[str, Any],
    chosen: list[str] | None = None,
) -> dict[str, Any]:
    return {
        "seed": seed,
        "strategy": strategy,
        "round": r,
        "n_labelled": len(labelled),
        "added": chosen or [],
        "val_dice": res["val_dice"],
        "test_dice": res["test_dice"],
        "train_seconds": res["train_seconds"],
    }


def summarise(
    args: argparse.Namespace, name: str, n: int, k0: int, k_add: int, runs: list[dict[str, Any]]
) -> dict[str, Any]:
    """Per strategy and round: mean and std over seeds; the verdict on test Dice."""
    summary: dict[str, dict[str, Any]] = {}
    for s in args.strategies:
        summary[s] = {}
        for r in range(args.rounds + 1):
            rows = [x for x in runs if x["strategy"] == s and x["round"] == r]
            vm, vs = _mean_std([x["val_dice"] for x in rows])
            tm, ts = _mean_std([x["test_dice"] for x in rows])
            summary[s][str(r)] = {
                "n_labelled": rows[0]["n_labelled"] if rows else None,
                "val_mean": vm,
                "val_std": vs,
                "test_mean": tm,
                "test_std": ts,
                "n_seeds": len(rows),
            }
    verdict: dict[str, Any] = {}
    if set(STRATEGIES) <= set(args.strategies) and args.rounds > 0:
        last = str(args.rounds)
        du = summary["uncertainty"][last]["test_mean"] - summary["random"][last]["test_mean"]
        later = [str(r) for r in range(1, args.rounds + 1)]
        avg = float(
            np.mean(
                [summary["uncertainty"][r]["test_mean"] - summary["random"][r]["test_mean"] for r in later]
            )
        )
        verdict = {
            "final_round_test_dice_gain": du,
            "mean_test_dice_gain_rounds_1_to_last": avg,
            "uncertainty_beat_random": bool(du > 0),
            "text": f"uncertainty {'beat' if du > 0 else 'did not beat'} random on test Dice at round "
            f"{last} (mean over {len(args.seeds)} seed(s): {du:+.4f}; mean gain over rounds 1-{last}: "
            f"{avg:+.4f})",
        }
    return {
        "dataset": name,
        "data": str(args.data),
        "method": args.method,
        "preset": args.preset,
        "steps": args.steps,
        "max_minutes": args.max_minutes,
        "overrides": args.overrides,
        "seeds": args.seeds,
        "rounds": args.rounds,
        "n_train_tiles": n,
        "initial": k0,
        "added_per_round": k_add,
        "metric": "foreground Dice, dataset level (evaluate --foreground-only); weights selected on val",
        "runs": runs,
        "summary": summary,
        "verdict": verdict,
        "environment": {"python": platform.python_version(), "machine": platform.machine()},
    }


def markdown(result: dict[str, Any]) -> str:
    """Return the per-round table (mean ± std over seeds) and the verdict as Markdown."""
    strategies = list(result["summary"])
    head = "| round | labelled |" + "".join(f" {s} val | {s} test |" for s in strategies)
    lines = [
        f"Active learning on `{result['dataset']}` with `{result['method']}` ({result['preset']}), "
        f"{len(result['seeds'])} seed(s); foreground Dice (mean ± std over seeds).",
        "",
        head,
        "|" + "---|" * (2 + 2 * len(strategies)),
    ]
    for r in range(result["rounds"] + 1):
        row = result["summary"][strategies[0]][str(r)]
        cells = [str(r), str(row["n_labelled"])]
        for s in strategies:
            x = result["summary"][s][str(r)]
            cells += [
                f"{x['val_mean']:.4f} ± {x['val_std']:.4f}",
                f"{x['test_mean']:.4f} ± {x['test_std']:.4f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    if result["verdict"]:
        lines += ["", result["verdict"]["text"] + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the experiment and write the JSON and Markdown results."""
    args = parse_args(argv)
    if args.steps is None and args.max_minutes is None:
        print(
            "note: neither --steps nor --max-minutes given; each round trains for the preset's budget",
            file=sys.stderr,
        )
    t0 = time.perf_counter()
    result = run_experiment(args)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    from ldiffusion.core.io import atomic_write_bytes, write_json

    write_json(args.out, result)
    md = markdown(result)
    atomic_write_bytes(args.out.with_suffix(".md"), md.encode())
    print(md)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')} ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
