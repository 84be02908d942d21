"""nnU-Net v2 side by side: export a prepared data set, train `2d` on a wall-clock budget, score with ours.

Not part of the package, the tests or CI. nnU-Net lives in its own virtual environment (see
docs/peers.md), and this script drives it through its command-line tools; our own `ldiffusion
evaluate` scores the predictions, with the scoring conventions of `benchmarks/accuracy.py`. Stages:

1. Export `--data` (a prepared ldiffusion data set) to nnU-Net's raw format under `--work`:
   `DatasetNNN_Name/imagesTr/<id>_0000.png` (RGB PNG; channel_names R, G, B; file_ending .png) and
   `labelsTr/<id>.png` (uint8 class ids) for the train and val splits, `imagesTs/<id>_0000.png` for
   the test split. Our ignore value 255 becomes nnU-Net's ignore label (the number of classes,
   declared as "ignore" in dataset.json) when a train or val label holds it; MoNuSeg's hold none.
2. `nnUNetv2_plan_and_preprocess -d N -c 2d --verify_dataset_integrity` (nnU-Net's default plan,
   unchanged), then a one-fold `splits_final.json` holding OUR train/val split as fold 0.
3. `nnUNetv2_train N 2d 0 -tr nnUNetTrainer_ldiffusionBudget -device cpu`: nnU-Net's trainer with
   `--iters` iterations and `--val-iters` validation iterations per epoch, stopped by a wall-clock
   budget (`--minutes`); see `nnunet_trainer.py`. This script WRITES that trainer module into the
   nnU-Net installation of `--nnunet-venv`, as
   `nnunetv2/training/nnUNetTrainer/nnUNetTrainer_ldiffusion.py`: nnU-Net finds trainers only there,
   and only modules directly in that folder import beside CPU torch.
4. `nnUNetv2_predict -chk checkpoint_best.pth -device cpu` on the test split (`--no-mirroring`: no
   test-time flips); predictions copied as `<id>.png` uint8 class maps, then scored with `ldiffusion
   evaluate` (MoNuSeg: `--foreground-only --instances`, again with `--watershed --min-distance 9`).
5. Write `--out` (default benchmarks/results/<date>-<dataset>-nnunet.json, the accuracy.py schema,
   so that `benchmarks/report.py` reads it) and a Markdown table beside it, and print its rows.

Every command is printed before it runs; nnU-Net's output goes to `<run>/logs/<stage>.log`.

Examples (run with the project's environment, which `ldiffusion evaluate` also comes from):
    .venv/bin/python benchmarks/peers/nnunet.py --help
    # the MoNuSeg row: 20 min of training on this machine's CPU
    .venv/bin/python benchmarks/peers/nnunet.py --data ~/.cache/ldiffusion/data/monuseg --minutes 20
    # smoke test of every stage: 2 epochs x 2 iterations, 2 test images, written to the work folder
    .venv/bin/python benchmarks/peers/nnunet.py --data ~/.cache/ldiffusion/data/monuseg --minutes 2 \\
        --epochs 2 --iters 2 --val-iters 1 --max-test 2 --no-mirroring --tag smoke \\
        --out ~/.cache/ldiffusion/nnunet/smoke.json
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
TRAINER = "nnUNetTrainer_ldiffusionBudget"
TRAINER_SOURCE = Path(__file__).with_name("nnunet_trainer.py")
TRAINER_MODULE = "nnUNetTrainer_ldiffusion.py"
EXPORT_RECORD = "ldiffusion_export.json"
CHANNELS = {"0": "R", "1": "G", "2": "B"}


# ------------------------------------------------------------------ export (pure file work, no nnunetv2)


def nnunet_folder(dataset_id: int, name: str) -> str:
    """Return nnU-Net's data set folder name, e.g. `Dataset501_monuseg` (name reduced to [A-Za-z0-9])."""
    if not 1 <= dataset_id <= 999:
        from ldiffusion.core.errors import ConfigError

        raise ConfigError(f"--dataset-id {dataset_id}: expected an integer in 1..999 (nnU-Net's 3-digit ids)")
    return f"Dataset{dataset_id:03d}_{re.sub(r'[^A-Za-z0-9]', '', name) or 'data'}"


def export_dataset(data: Path, raw_root: Path, dataset_id: int) -> dict[str, Any]:
    """Write a prepared ldiffusion data set as an nnU-Net v2 raw data set.

    Layout written under `raw_root/DatasetNNN_Name/` (built in a staging folder, then renamed; an
    earlier export of this script is replaced, any other folder of that name is refused):
    `imagesTr/<id>_0000.png` RGB uint8 (H, W, 3) for the train and val ids, `labelsTr/<id>.png`
    uint8 (H, W) class ids, `imagesTs/<id>_0000.png` for the test ids, `dataset.json`
    (channel_names R, G, B; labels by class name; file_ending .png; NaturalImage2DIO) and
    `ldiffusion_export.json` (what was exported from where).

    Label convention: class ids 0..K-1 are kept; our ignore value 255 is mapped to K and declared as nnU-Net's
    "ignore" label when any train/val label holds it (nnU-Net then leaves those pixels out of the loss, as our
    trainers do); otherwise no ignore label is declared. Any other value is an error.

    Args:
        data: prepared data set folder (dataset.json with splits train, val, test; images/, labels/).
        raw_root: nnU-Net's `nnUNet_raw` folder.
        dataset_id: nnU-Net data set id, 1..999.

    Returns:
        The export record: folder, name, ids per split, labels, ignore label (or None), source path.

    Raises:
        DatasetFormatError: a split is missing or empty, a file is missing, or a label value is unknown.
        InputError: the target folder exists and was not written by this script.
    """
    from ldiffusion.core.errors import DatasetFormatError, InputError
    from ldiffusion.core.io import write_json
    from ldiffusion.data.dataset import sample_path
    from ldiffusion.data.format import read_dataset_info, read_image, read_mask, write_png

    info = read_dataset_info(data)
    splits = {s: info.ids(s) for s in ("train", "val", "test")}
    for s, ids in splits.items():
        if not ids:
            raise DatasetFormatError(f"{data / 'dataset.json'}: split {s!r} is empty; expected ids to export")
    k = info.num_classes
    if [c.id for c in info.classes] != list(range(k)):
        raise DatasetFormatError(f"{data / 'dataset.json'}: class ids {[c.id for c in info.classes]}; "
                                 f"expected 0..{k - 1}")
    names: dict[str, int] = {}
    for c in info.classes:
        name = c.name if c.name not in names and c.name != "ignore" else f"{c.name}_{c.id}"
        names[name] = c.id
    folder = nnunet_folder(dataset_id, info.name)
    target = raw_root / folder
    if target.exists() and not (target / EXPORT_RECORD).is_file():
        raise InputError(f"{target}: exists and was not written by benchmarks/peers/nnunet.py; "
                         "choose another --dataset-id or --work")
    stage = raw_root / f".{folder}.staging-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (stage / sub).mkdir(parents=True)

    def path_of(sub: str, case_id: str) -> Path:
        p = sample_path(data, sub, case_id)
        if p is None:
            raise DatasetFormatError(f"{data / sub}: no file for id {case_id!r}")
        return p

    def put_image(case_id: str, dst: Path) -> None:
        src = path_of("images", case_id)
        if src.suffix.lower() == ".png":
            from PIL import Image

            with Image.open(src) as im:
                plain = im.mode == "RGB"
            if plain:
                shutil.copyfile(src, dst)
                return
        write_png(dst, read_image(src))  # (H, W, 3) uint8

    has_ignore = False
    labels: dict[str, np.ndarray] = {}
    try:
        for case_id in splits["train"] + splits["val"]:
            lab = read_mask(path_of("labels", case_id))
            bad = np.setdiff1d(np.unique(lab), [*range(k), info.ignore_index])
            if bad.size:
                raise DatasetFormatError(f"{path_of('labels', case_id)}: label values {bad.tolist()}; "
                                         f"expected 0..{k - 1} or {info.ignore_index} (ignore)")
            has_ignore |= bool((lab == info.ignore_index).any())
            labels[case_id] = lab
        for case_id in splits["train"] + splits["val"]:
            lab = labels.pop(case_id)
            out = np.where(lab == info.ignore_index, k, lab).astype(np.uint8)
            write_png(stage / "labelsTr" / f"{case_id}.png", out)
            put_image(case_id, stage / "imagesTr" / f"{case_id}_0000.png")
        for case_id in splits["test"]:
            put_image(case_id, stage / "imagesTs" / f"{case_id}_0000.png")
        label_map = dict(names, **({"ignore": k} if has_ignore else {}))
        write_json(stage / "dataset.json", {
            "channel_names": CHANNELS, "labels": label_map,
            "numTraining": len(splits["train"]) + len(splits["val"]), "file_ending": ".png",
            "overwrite_image_reader_writer": "NaturalImage2DIO", "name": info.name,
            "description": f"exported by ldiffusion benchmarks/peers/nnunet.py from {data}",
            "reference": info.source, "licence": info.license})
        record = {"folder": folder, "name": info.name, "source": str(data.resolve()), "splits": splits,
                  "labels": label_map, "ignore_label": k if has_ignore else None, "num_classes": k}
        write_json(stage / EXPORT_RECORD, record)
        if target.exists():
            shutil.rmtree(target)
        os.replace(stage, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return record


def splits_final(record: dict[str, Any]) -> list[dict[str, list[str]]]:
    """Return nnU-Net's `splits_final.json` content: one fold: our train and val ids."""
    return [{"train": list(record["splits"]["train"]), "val": list(record["splits"]["val"])}]


def convert_predictions(src: Path, dst: Path, ids: list[str], num_classes: int) -> None:
    """Copy nnU-Net's `<id>.png` predictions into `dst` as our `<id>.png` uint8 (H, W) class maps.

    Raises:
        InputError: a prediction is missing or holds a value outside 0..num_classes-1.
    """
    from ldiffusion.core.errors import InputError
    from ldiffusion.data.format import read_mask, write_png

    dst.mkdir(parents=True, exist_ok=True)
    for case_id in ids:
        p = src / f"{case_id}.png"
        if not p.is_file():
            raise InputError(f"{p}: nnU-Net wrote no prediction for {case_id!r}")
        pred = read_mask(p)
        if pred.size and int(pred.max()) >= num_classes:
            raise InputError(f"{p}: class id {int(pred.max())}; expected 0..{num_classes - 1}")
        write_png(dst / f"{case_id}.png", pred.astype(np.uint8))


def subset_view(data: Path, ids: list[str], view: Path) -> Path:
    """Make `view`: a data set whose test split is `ids`, its image/label folders linked to `data`'s."""
    from ldiffusion.core.io import write_json

    meta = json.loads((data / "dataset.json").read_text())
    meta["splits"]["test"] = list(ids)
    meta.pop("parts", None)
    view.mkdir(parents=True, exist_ok=True)
    for sub in ("images", "labels", "instances"):
        link = view / sub
        if link.is_symlink():
            link.unlink()
        if (data / sub).is_dir():
            link.symlink_to((data / sub).resolve(), target_is_directory=True)
    write_json(view / "dataset.json", meta)
    return view


# ------------------------------------------------------------------ driving nnU-Net


class Runner:
    """Print and run commands with nnU-Net's environment, each one logged to `<logs>/<name>.log`."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = {**os.environ, **env}
        self.shown_env = env
        self.logs = logs
        self.log: list[dict[str, Any]] = []

    def __call__(self, name: str, args: list[str], extra_env: dict[str, str] | None = None) -> dict[str, Any]:
        """Run `args`; return {command, wall_s, returncode, log[, error]}."""
        extra = extra_env or {}
        shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in extra.items())
        shown = (shown + " " if shown else "") + shlex.join(args)
        print(f"$ {shown}", flush=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        t0 = time.perf_counter()
        with log.open("w") as f:
            proc = subprocess.run(args, env={**self.env, **extra}, stdout=f, stderr=subprocess.STDOUT,
                                  text=True)
        rec: dict[str, Any] = {"command": shown, "wall_s": round(time.perf_counter() - t0, 1),
                               "returncode": proc.returncode, "log": str(log)}
        print(f"  {rec['wall_s']:.1f} s, exit {proc.returncode}, log {log}", flush=True)
        if proc.returncode != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-15:]
            print("\n".join(tail), file=sys.stderr, flush=True)
            rec["error"] = tail[-1] if tail else f"exit {proc.returncode}"
        self.log.append(rec)
        return rec


def _venv_python(venv: Path) -> Path:
    from ldiffusion.core.errors import InputError

    py = venv / "bin" / "python"
    if not py.is_file():
        raise InputError(f"--nnunet-venv {venv}: no bin/python; build it as docs/peers.md says")
    return py


def nnunet_versions(py: Path) -> dict[str, str]:
    """Return {nnunetv2, torch, nnunetv2_dir} of the nnU-Net environment (imports no trainer)."""
    from ldiffusion.core.errors import InputError

    code = ("import json, os, importlib.metadata as m, torch, nnunetv2; print(json.dumps({'nnunetv2': "
            "m.version('nnunetv2'), 'torch': torch.__version__, "
            "'nnunetv2_dir': os.path.dirname(nnunetv2.__file__)}))")
    proc = subprocess.run([str(py), "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise InputError(f"{py}: cannot import nnunetv2 and torch ({last}); see docs/peers.md")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def install_trainer(nnunetv2_dir: Path) -> Path:
    """Write the budget trainer into nnU-Net's trainer folder (replaced when it differs); return its path."""
    dst = nnunetv2_dir / "training" / "nnUNetTrainer" / TRAINER_MODULE
    src = TRAINER_SOURCE.read_bytes()
    if not dst.is_file() or dst.read_bytes() != src:
        tmp = dst.with_name(dst.name + ".tmp")
        tmp.write_bytes(src)
        os.replace(tmp, dst)
    return dst


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def scorings(name: str, data: Path) -> tuple[tuple[str, ...], list[tuple[str, tuple[str, ...]]], str]:
    """Return (evaluate flags, [(label, extra flags)], note) of a data set, as accuracy.py scores it."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from accuracy import DATASETS
    finally:
        sys.path.pop(0)
    spec = DATASETS.get(name)
    if spec is None:
        flags = ("--foreground-only", *(("--instances",) if (data / "instances").is_dir() else ()))
        return flags, [("test", ())], "data set not in benchmarks/accuracy.py: foreground (+ instances)"
    extra = [(label, tuple(f)) for label, split, f in spec.extra if split == "test"]
    return spec.eval_flags, [("test", ()), *extra], spec.note


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="prepared ldiffusion data set (dataset.json)")
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "ldiffusion" / "nnunet",
                   help="nnU-Net's raw, preprocessed and run folders (default ~/.cache/ldiffusion/nnunet)")
    p.add_argument("--nnunet-venv", type=Path, default=REPO.parent / "nnunet_venv",
                   help="environment holding nnunetv2 (default: nnunet_venv beside the repository)")
    p.add_argument("--ldiffusion", type=Path, default=REPO / ".venv" / "bin" / "ldiffusion",
                   help="the ldiffusion command used for scoring (default: the repository's .venv)")
    p.add_argument("--dataset-id", type=int, default=501, help="nnU-Net data set id (default 501)")
    p.add_argument("--minutes", type=float, default=20.0, help="training wall-clock budget (default 20)")
    p.add_argument("--epochs", type=int, default=1000, help="most epochs (default 1000)")
    p.add_argument("--iters", type=int, default=5, help="training iterations per epoch (default 5)")
    p.add_argument("--val-iters", type=int, default=1, help="validation iterations per epoch (default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of training (default: nnU-Net's, all cores; predict always uses all)")
    p.add_argument("--checkpoint", default="checkpoint_best.pth", choices=["checkpoint_best.pth",
                   "checkpoint_final.pth"], help="weights to predict with (best: chosen on validation)")
    p.add_argument("--no-mirroring", action="store_true", help="predict without nnU-Net's test-time flips")
    p.add_argument("--max-test", type=int, default=None, help="predict and score only the first N test ids")
    p.add_argument("--reuse", action="store_true",
                   help="keep the preprocessed data of an identical export (skip plan_and_preprocess)")
    p.add_argument("--tag", default=None, help="run name suffix (default: <minutes>min[-nomirror])")
    p.add_argument("--out", type=Path, default=None,
                   help="result JSON (default benchmarks/results/<date>-<dataset>-nnunet.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run every stage; return 0 on success, 1 when a command failed, 2 on bad input."""
    args = parse_args(argv)
    from ldiffusion.core.errors import LDiffusionError

    try:
        return _main(args, argv)
    except LDiffusionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace, argv: list[str] | None) -> int:
    import ldiffusion
    from ldiffusion.core.errors import ConfigError, InputError
    from ldiffusion.core.io import write_json

    for key in ("minutes", "epochs", "iters", "val_iters"):
        if getattr(args, key) <= 0:
            raise ConfigError(f"--{key.replace('_', '-')} {getattr(args, key)}: expected a positive number")
    if args.max_test is not None and args.max_test <= 0:
        raise ConfigError(f"--max-test {args.max_test}: expected a positive integer")
    if not args.ldiffusion.is_file():
        raise InputError(f"--ldiffusion {args.ldiffusion}: not found; expected the ldiffusion command")
    data = args.data.expanduser().resolve()
    work = args.work.expanduser().resolve()
    py = _venv_python(args.nnunet_venv.expanduser())
    bin_dir = py.parent
    t_start = time.perf_counter()

    # 1. export
    t0 = time.perf_counter()
    print(f"# exporting {data} to nnU-Net's raw format under {work / 'nnUNet_raw'}", flush=True)
    record = export_dataset(data, work / "nnUNet_raw", args.dataset_id)
    export_s = round(time.perf_counter() - t0, 1)
    folder, name = record["folder"], record["name"]
    tag = args.tag or f"{args.minutes:g}min" + ("-nomirror" if args.no_mirroring else "")
    run = work / "runs" / f"{folder}-{tag}"
    env = {"nnUNet_raw": str(work / "nnUNet_raw"), "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
           "nnUNet_results": str(run / "nnUNet_results"), "nnUNet_compile": "f"}
    runner = Runner(env, run / "logs")
    print("# nnU-Net environment (these processes only): " + " ".join(f"{k}={v}" for k, v in env.items()))
    versions = nnunet_versions(py)
    trainer_path = install_trainer(Path(versions["nnunetv2_dir"]))
    print(f"# wrote the budget trainer {TRAINER} to {trainer_path}", flush=True)

    # 2. plan and preprocess, then our split as fold 0
    pre = work / "nnUNet_preprocessed" / folder
    fingerprint = hashlib.sha256(json.dumps({k: record[k] for k in ("splits", "labels", "source")},
                                            sort_keys=True).encode()).hexdigest()
    same = (pre / EXPORT_RECORD).is_file() and \
        json.loads((pre / EXPORT_RECORD).read_text()).get("fingerprint") == fingerprint
    failed = False
    if args.reuse and same and (pre / "nnUNetPlans.json").is_file():
        print(f"# reusing the preprocessed data in {pre} (--reuse)", flush=True)
        preprocess_s = None
    else:
        rec = runner("plan_and_preprocess", [str(bin_dir / "nnUNetv2_plan_and_preprocess"), "-d",
                                             str(args.dataset_id), "-c", "2d", "--verify_dataset_integrity",
                                             "-np", "1", "-npfp", "1"])
        preprocess_s = rec["wall_s"]
        if rec.get("error"):
            print(f"error: nnUNetv2_plan_and_preprocess failed: {rec['error']}", file=sys.stderr)
            return 1
        write_json(pre / EXPORT_RECORD, {**record, "fingerprint": fingerprint})
    write_json(pre / "splits_final.json", splits_final(record))
    plan = json.loads((pre / "nnUNetPlans.json").read_text())["configurations"]["2d"]

    # 3. train fold 0 on the budget
    results = run / "nnUNet_results"
    if results.exists():
        shutil.rmtree(results)  # a fresh run: nnU-Net would otherwise mix in an earlier run's checkpoints
    train_env = {"LDIFFUSION_NNUNET_BUDGET_S": f"{60 * args.minutes:g}",
                 "LDIFFUSION_NNUNET_EPOCHS": str(args.epochs), "LDIFFUSION_NNUNET_ITERS": str(args.iters),
                 "LDIFFUSION_NNUNET_VAL_ITERS": str(args.val_iters),
                 **({"LDIFFUSION_NNUNET_THREADS": str(args.threads)} if args.threads else {})}
    rec = runner("train", [str(bin_dir / "nnUNetv2_train"), str(args.dataset_id), "2d", "0", "-tr", TRAINER,
                           "-device", "cpu"], train_env)
    train_s = rec["wall_s"]
    fold = results / folder / f"{TRAINER}__nnUNetPlans__2d" / "fold_0"
    budget_info = json.loads((fold / "ldiffusion_budget.json").read_text()) \
        if (fold / "ldiffusion_budget.json").is_file() else {}
    if rec.get("error") or not (fold / args.checkpoint).is_file():
        print(f"error: nnUNetv2_train failed: {rec.get('error', 'no ' + args.checkpoint)}", file=sys.stderr)
        return 1

    # 4. predict the test split, convert, score
    test_ids = record["splits"]["test"][: args.max_test] if args.max_test else record["splits"]["test"]
    pred_in = run / "predict_input"
    shutil.rmtree(pred_in, ignore_errors=True)
    pred_in.mkdir(parents=True)
    for case_id in test_ids:
        (pred_in / f"{case_id}_0000.png").symlink_to(work / "nnUNet_raw" / folder / "imagesTs" /
                                                      f"{case_id}_0000.png")
    pred_raw, pred = run / "pred-nnunet", run / "pred-test"
    for d in (pred_raw, pred):
        shutil.rmtree(d, ignore_errors=True)
    rec = runner("predict", [str(bin_dir / "nnUNetv2_predict"), "-i", str(pred_in), "-o", str(pred_raw),
                             "-d", str(args.dataset_id), "-c", "2d", "-f", "0", "-tr", TRAINER,
                             "-chk", args.checkpoint, "-device", "cpu", "-npp", "1", "-nps", "1",
                             "--disable_progress_bar",
                             *(["--disable_tta"] if args.no_mirroring else [])])
    predict_s = rec["wall_s"]
    if rec.get("error"):
        print(f"error: nnUNetv2_predict failed: {rec['error']}", file=sys.stderr)
        return 1
    convert_predictions(pred_raw, pred, test_ids, record["num_classes"])
    score_data = data if not args.max_test else subset_view(data, test_ids, run / "score-data")
    flags, scored, note = scorings(name, data)
    scores: dict[str, Any] = {}
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from accuracy import headline, markdown
    finally:
        sys.path.pop(0)
    for label, extra in scored:
        metrics = run / f"metrics-{label}.json"
        r = runner(f"evaluate-{label}", [str(args.ldiffusion), "evaluate", "--pred", str(pred),
                                         "--data", str(score_data), "--split", "test", "--out", str(metrics),
                                         *flags, *extra, "--no-progress"])
        if r.get("error"):
            failed = True
            scores[label] = {"error": r["error"]}
        else:
            scores[label] = headline(json.loads(metrics.read_text()))

    # 5. result file
    date = datetime.date.today().isoformat()
    out = (args.out.expanduser() if args.out
           else REPO / "benchmarks" / "results" / f"{date}-{name}-nnunet.json")
    mirror = "without" if args.no_mirroring else "with"
    res: dict[str, Any] = {
        "schema": 1, "date": date, "machine": f"{socket.gethostname().split('.')[0] or 'host'}-cpu",
        "device": "cpu", "preset": f"nnU-Net v2 {versions['nnunetv2']} default 2d plan",
        "seed": "none (nnU-Net's own unseeded sampling)", "tag": tag, "annotated_fraction": None,
        "threads": budget_info.get("threads", args.threads), "overrides": [],
        "budget": f"at most {args.minutes:g} min of nnU-Net training (run_training wall clock), "
                  f"{args.iters} iterations + {args.val_iters} validation iteration(s) per epoch",
        "ldiffusion": ldiffusion.__version__, "torch": versions["torch"],
        "python": sys.version.split()[0], "git_commit": _git_commit(),
        "command": "python benchmarks/peers/nnunet.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "conventions": {name: {"flags": " ".join(flags), "note": note, "data": str(data)}},
        "results": [{
            "dataset": name, "method": "nnunet-2d", "tag": tag, "run": str(run), "commands": runner.log,
            "train_s": train_s, "predict_s": predict_s, "val_score": budget_info.get("best_ema_pseudo_dice"),
            "scores": scores,
            "nnunet": {"version": versions["nnunetv2"], "trainer": TRAINER,
                       "trainer_module": str(trainer_path), "dataset": folder, "configuration": "2d",
                       "fold": 0, "checkpoint": args.checkpoint,
                       "mirroring": mirror + " test-time mirroring", "n_test": len(test_ids),
                       "patch_size": plan.get("patch_size"), "batch_size": plan.get("batch_size"),
                       "ignore_label": record["ignore_label"], "export_s": export_s,
                       "preprocess_s": preprocess_s,
                       "val_score_note": "best EMA pseudo Dice of nnU-Net's per-epoch validation patches",
                       **{k: v for k, v in budget_info.items() if k not in ("threads",)}},
        }],
        "run_time_s": round(time.perf_counter() - t_start, 1),
    }
    _write(out, json.dumps(res, indent=1) + "\n")
    md = markdown(res)
    _write(out.with_suffix(".md"), md)
    print(md)
    print(f"wrote {out} and {out.with_suffix('.md')} ({res['run_time_s']:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
