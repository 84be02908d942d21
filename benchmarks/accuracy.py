"""Accuracy benchmark: train, select on validation, predict and score the test split, per method x data set.

For every data set and method this runs exactly the commands a user would type (each is printed
before it runs, so the log can be pasted into docs):

    ldiffusion data prepare <converter> <shared>/<source> <cache>/<dataset>
    ldiffusion train --method M --data <cache>/<dataset> --out <runs>/<dataset>/<M>-<preset>-seed<S> ...
    ldiffusion predict <run> --data <cache>/<dataset> --split test --out <run>/pred-test ...
    ldiffusion evaluate --pred <run>/pred-test --data <cache>/<dataset> --split <part> --out ... <conventions>

`train` keeps the weights chosen on the validation split (the fit loop does the selection; the
test split is read only by `predict` and `evaluate`). Scoring conventions per data set:

| data set | converter | evaluate flags | metrics |
|---|---|---|---|
| monuseg | monuseg | --foreground-only --instances | nucleus Dice/IoU, AJI, PQ (connected components) |
| consep | consep-tiles | --foreground-only | Dice/mIoU of the 4 nucleus classes (no instance maps here) |
| glas | glas | --foreground-only (+ gland metrics) | Dice, object F1/Dice/Hausdorff; test, testA, testB |
| wsss4luad | wsss4luad | --foreground-only | Dice/mIoU of the 3 tissue classes |

Data sets are read from `--shared-data` (default ../shared/data) and converted into
`--data-cache` (default ~/.cache/ldiffusion/data, outside the repository); `data prepare` skips a
data set whose manifest is up to date. The converters draw the validation split with `--seed`, so
each seed has its own folder (`<dataset>` for seed 0, `<dataset>-seed<S>` otherwise): two runs of
different seeds side by side never convert into the same folder. Runs go to `--runs` (default
benchmarks/runs/, git-ignored).
`--dataset-dir NAME=DIR` uses an already prepared data set (no conversion), e.g. a synthetic one.

Budget: the preset's step counts by default; `--steps N` sets every stage's optimiser steps
(the method's `stage_step_keys`, epochs cleared), `--max-minutes M` caps each stage's wall clock.

Examples:
    python benchmarks/accuracy.py --dry-run --datasets monuseg
    python benchmarks/accuracy.py --datasets monuseg glas --methods unet cdal --max-minutes 30
    python benchmarks/accuracy.py --datasets synth --dataset-dir synth=/tmp/synth --methods unet \\
        --preset tiny --steps 5 --runs /tmp/runs --out /tmp/acc.json

Writes `--out` (default benchmarks/results/<date>-<machine>.json) and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_METHODS = ("unet", "ldiffusion", "ldseg", "cdal")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How one public data set is prepared and scored."""

    converter: str
    source: str  # folder under --shared-data
    eval_flags: tuple[str, ...]
    parts: tuple[str, ...] = ("test",)  # splits/parts scored from the one test prediction
    note: str = ""
    #: further scorings of the test prediction: (label, split, extra evaluate flags)
    extra: tuple[tuple[str, str, tuple[str, ...]], ...] = ()


DATASETS: dict[str, DatasetSpec] = {
    "monuseg": DatasetSpec("monuseg", "monuseg", ("--foreground-only", "--instances"),
                           note="nucleus Dice + AJI/PQ from connected components of the class map; "
                                "row 'test-watershed': instances split by a distance-transform watershed "
                                "with markers >= 9 px apart (chosen on the validation images)",
                           extra=(("test-watershed", "test", ("--watershed", "--min-distance", "9")),)),
    "consep": DatasetSpec("consep-tiles", "consep_tiles", ("--foreground-only",),
                          note="4 nucleus classes, foreground only; no instance maps in this copy"),
    "glas": DatasetSpec("glas", "glas", ("--foreground-only",), ("test", "testA", "testB"),
                        note="gland Dice + object F1 / Dice / Hausdorff (automatic for GlaS)"),
    "wsss4luad": DatasetSpec("wsss4luad", "wsss4luad", ("--foreground-only",),
                             note="3 tissue classes, foreground only"),
}


def _default_shared() -> Path:
    for c in (REPO.parent / "shared" / "data", Path("/work/shared/data")):
        if (c / "README.md").is_file():
            return c
    return REPO.parent / "shared" / "data"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), help=f"data sets ({', '.join(DATASETS)} "
                   "or a name given with --dataset-dir)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="methods to train")
    p.add_argument("--preset", default="small", help="method preset (default: small)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimiser steps of every stage (overrides the preset; epochs cleared)")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget per training stage")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="config override key=value for every method, or method:key=value (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed of training, prediction and data splits")
    p.add_argument("--annotated-fraction", type=float, default=None,
                   help="train --annotated-fraction (share of training images that keep their labels)")
    p.add_argument(
        "--tag", default="", help="suffix of the run folder names (e.g. an ablation: noise-gaussian)"
    )
    p.add_argument("--tta", action="store_true",
                   help="predict with test-time augmentation (8 flips/rotations): predictions in "
                        "pred-test-tta, scores in metrics-<split>-tta.json; with --reuse-runs, trained runs "
                        "are scored again")
    p.add_argument("--stain-normalize", action="store_true",
                   help="predict with `--stain-normalize DATA` (Reinhard onto the data set's own train "
                        "split): predictions in pred-test-stainnorm, scores in "
                        "metrics-<split>-stainnorm.json")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP/torch threads of every command (default: torch's choice)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--shared-data", type=Path, default=_default_shared(),
                   help="folder of the public releases")
    p.add_argument("--data-cache", type=Path, default=Path.home() / ".cache" / "ldiffusion" / "data",
                   help="where prepared data sets are written (outside the repository)")
    p.add_argument("--dataset-dir", action="append", default=[], metavar="NAME=DIR",
                   help="use an already prepared data set folder for NAME (repeatable)")
    p.add_argument("--runs", type=Path, default=REPO / "benchmarks" / "runs", help="folder of run folders")
    p.add_argument("--reuse-runs", action="store_true",
                   help="score finished run folders without training again (unfinished ones are resumed)")
    p.add_argument("--resume", action="store_true", help="continue interrupted runs (train --resume)")
    p.add_argument("--predict-set", action="append", default=[], metavar="KEY=VALUE",
                   help="inference-time config change for predict (`predict --set`, repeatable), e.g. "
                        "min_object_px=1000 chosen with benchmarks/choose_min_object.py; predictions and "
                        "scores then go to pred-test-<key>-<value> and metrics-<split>-<key>-<value>.json")
    p.add_argument("--snapshot-minutes", type=float, nargs="+", default=[],
                   help="learning-curve points: train --snapshot-minutes M, then score each snapshot as a "
                        "row of its own (the weights a --max-minutes M run keeps)")
    p.add_argument("--batch-size", type=int, default=None, help="predict --batch-size (tiles per pass)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output (default benchmarks/results/<date>-<machine>.json; .md beside it)")
    return p.parse_args(argv)


def _ldiffusion_exe() -> list[str]:
    exe = Path(sys.executable).with_name("ldiffusion")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("ldiffusion")
    if found:
        return [found]
    return [sys.executable, "-c", "from ldiffusion.cli import entry; entry()"]


def budget_text(steps: int | None, max_minutes: float | None, overrides: list[str]) -> str:
    """Describe the training budget of a run for its result file.

    Stage budgets given as `--set` overrides (e.g. ``ldiffusion:seg_max_minutes=13``) are named too.
    """
    budget = []
    if steps is not None:
        budget.append(f"{steps} optimiser steps per stage")
    if max_minutes is not None:
        budget.append(f"at most {max_minutes:g} min per stage")
    for item in overrides:
        key, _, value = item.partition("=")
        if key.split(":")[-1].endswith("max_minutes"):
            budget.append(f"{key} = {value} min")
    return ", ".join(budget) or "the preset's step counts"


def budget_overrides(method: str, steps: int | None) -> list[str]:
    """Return `--set` values that give every stage of `method` exactly `steps` optimiser steps."""
    if steps is None:
        return []
    import dataclasses as dc

    from ldiffusion.methods import METHODS

    cls = METHODS.get(method)
    fields = {f.name for f in dc.fields(cls.config_cls)}
    out = []
    for key in cls.stage_step_keys:
        out.append(f"{key}={steps}")
        epochs = key[: -len("steps")] + "epochs"
        if epochs in fields:
            out.append(f"{epochs}=null")
    return out


def method_overrides(method: str, items: list[str]) -> list[str]:
    """Select the `--set` items for `method`: plain `key=value` and `method:key=value`."""
    out = []
    for item in items:
        key = item.split("=", 1)[0]
        if ":" in key:
            name, rest = item.split(":", 1)
            if name == method:
                out.append(rest)
        else:
            out.append(item)
    return out


class Runner:
    """Print and (unless dry) run commands, recording their wall time."""

    def __init__(self, dry: bool) -> None:
        self.dry = dry
        self.exe = _ldiffusion_exe()
        self.log: list[dict[str, Any]] = []

    def __call__(self, args: list[str]) -> dict[str, Any]:
        shown = "ldiffusion " + shlex.join(args)
        print(f"$ {shown}", flush=True)
        rec: dict[str, Any] = {"command": shown}
        if not self.dry:
            t0 = time.perf_counter()
            proc = subprocess.run([*self.exe, *args], text=True, capture_output=True)
            rec["wall_s"] = round(time.perf_counter() - t0, 1)
            rec["returncode"] = proc.returncode
            if proc.stdout.strip():
                print(proc.stdout.rstrip(), flush=True)
            if proc.returncode != 0:
                tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
                print(tail, file=sys.stderr, flush=True)
                rec["error"] = tail.splitlines()[-1] if tail else f"exit {proc.returncode}"
        self.log.append(rec)
        return rec


def _best_val(run: Path) -> float | None:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    best = None
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("type") == "stage_end":
            best = rec.get("best_score")
    return best


def _training_extent(run: Path, steps: int | None = None) -> dict[str, int]:
    """Return {"steps", "batch_size", "crops"} of a run's last training stage, as far as the run folder tells.

    `steps` is the last stage's step count (a snapshot's own count when given, else the last `stage_end` of
    `metrics.jsonl`); `batch_size` is that stage's (`config.resolved.json`, per process); `crops` is the
    number of training crops the stage saw, steps x batch size x processes. Learning curves against crops
    (`plot_curves.py --x crops`) tell a method that learns less per crop from one that sees fewer crops in
    the same minutes. Keys that the folder cannot tell are left out.
    """
    out: dict[str, int] = {}
    log = run / "metrics.jsonl"
    if steps is None and log.is_file():
        for line in log.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("type") == "stage_end" and rec.get("step") is not None:
                steps = int(rec["step"])
    if steps is not None:
        out["steps"] = int(steps)
    resolved = run / "config.resolved.json"
    if resolved.is_file():
        info = json.loads(resolved.read_text())
        stages = info.get("stages") or []
        if stages and stages[-1].get("batch_size") is not None:
            out["batch_size"] = int(stages[-1]["batch_size"])
            if "steps" in out:
                out["crops"] = out["steps"] * out["batch_size"] * int(info.get("world_size", 1))
    return out


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """Pick the headline numbers of an `evaluate` result (fractions in [0, 1], Hausdorff in px)."""
    sem = metrics.get("semantic", {})
    out = {"dice": sem.get("dice"), "miou": sem.get("miou"), "mpa": sem.get("mpa"), "fwiou": sem.get("fwiou"),
           "dice_per_image": metrics.get("per_image_mean", {}).get("dice"),
           "n_images": metrics.get("n_images"), "convention": metrics.get("convention"),
           "per_class": {c["name"]: {"dice": c.get("dice"), "predicted_px": c.get("predicted"),
                                     "support_px": c.get("support")}
                         for c in sem.get("per_class", []) if c.get("scored")}}
    if "instance" in metrics:
        ins = metrics["instance"]
        out.update(aji=ins.get("aji"), pq=ins.get("pq"), dq=ins.get("dq"), sq=ins.get("sq"))
    if "gland" in metrics:
        g = metrics["gland"]
        out.update(obj_f1=g.get("f1"), obj_dice=g.get("dice"), obj_hausdorff=g.get("hausdorff"))
    return out


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def markdown(res: dict[str, Any]) -> str:
    """Render the results as a Markdown table (percentages; Hausdorff in px)."""
    commit = f", commit {res['git_commit'][:10]}" if res.get("git_commit") else ""
    lines = ["# Accuracy benchmark", "",
             f"- {res['date']} on {res['machine']} ({res['device']}), ldiffusion {res['ldiffusion']}, "
             f"torch {res['torch']}{commit}",
             f"- preset `{res['preset']}`, seed {res['seed']}, budget: {res['budget']}",
             *([f"- config overrides (`--set`): {', '.join(f'`{o}`' for o in res['overrides'])}"]
               if res.get("overrides") else []),
             *([f"- {res['threads']} thread(s) per command"] if res.get("threads") else []),
             *([f"- predict `--set`: {', '.join(f'`{o}`' for o in res['predict_set'])}"]
               if res.get("predict_set") else []),
             f"- command: `{res['command']}`",
             "- weights selected on the validation split; test split scored once with `ldiffusion evaluate`",
             ""]
    for ds, conv in res["conventions"].items():
        lines.append(f"- {ds}: `{conv['flags']}` ({conv['note']})")
    lines += ["", "| data set | split | method | Dice % | mIoU % | AJI % | PQ % | obj F1 % | obj Dice % | "
              "obj Hausdorff px | val score | train min | predict min |", "|" + "---|" * 13]
    for r in res["results"]:
        for part, m in r.get("scores", {}).items():
            if "error" in m:
                lines.append(f"| {r['dataset']} | {part} | {r['method']} | error: {m['error']} |"
                             + " |" * 9)
                continue
            haus, val = m.get("obj_hausdorff"), r.get("val_score")
            train_s, predict_s = r.get("train_s"), r.get("predict_s")
            label = r["method"] + (f" ({r['tag']})" if r.get("tag") else "")
            if r.get("snapshot_minutes") is not None:
                label += f" @ {r['snapshot_minutes']:g} min ({r['steps']} steps)"
            elif r.get("steps") is not None:
                label += f" ({r['steps']} steps)"
            cells = [r["dataset"], part, label, _pct(m.get("dice")), _pct(m.get("miou")),
                     _pct(m.get("aji")), _pct(m.get("pq")), _pct(m.get("obj_f1")), _pct(m.get("obj_dice")),
                     "-" if haus is None else f"{haus:.1f}", "-" if val is None else f"{val:.3f}",
                     "-" if train_s is None else f"{train_s / 60:.1f}",
                     "-" if predict_s is None else f"{predict_s / 60:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
        if not r.get("scores"):
            lines.append(f"| {r['dataset']} | - | {r['method']} | {r.get('error', 'not run')} |" + " |" * 9)
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def cache_name(dataset: str, seed: int) -> str:
    """Folder name of a prepared data set under `--data-cache`; its validation split depends on the seed.

    Example:
        >>> cache_name("glas", 0), cache_name("glas", 1)
        ('glas', 'glas-seed1')
    """
    return dataset if seed == 0 else f"{dataset}-seed{seed}"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return 0 when every command succeeded, 1 otherwise."""
    args = parse_args(argv)
    dirs: dict[str, Path] = {}
    for item in args.dataset_dir:
        if "=" not in item:
            raise SystemExit(f"--dataset-dir {item!r} should look like NAME=DIR")
        name, d = item.split("=", 1)
        dirs[name] = Path(d).expanduser()
    unknown = [d for d in args.datasets if d not in DATASETS and d not in dirs]
    if unknown:
        raise SystemExit(f"unknown data set(s) {unknown}; choose from {sorted(DATASETS)} or give "
                         "--dataset-dir NAME=DIR")
    import torch

    import ldiffusion
    from ldiffusion.methods import METHODS

    for m in args.methods:
        METHODS.get(m)  # unknown method -> error listing the choices
    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by every command
    run = Runner(args.dry_run)
    t0 = time.perf_counter()
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    machine = f"{socket.gethostname().split('.')[0] or 'host'}-{'cuda' if cuda else 'cpu'}"
    date = datetime.date.today().isoformat()
    out = args.out or REPO / "benchmarks" / "results" / f"{date}-{machine}.json"
    res: dict[str, Any] = {
        "schema": 1,
        "date": date,
        "machine": machine,
        "device": args.device,
        "preset": args.preset,
        "seed": args.seed,
        "tag": args.tag,
        "annotated_fraction": args.annotated_fraction,
        "threads": args.threads,
        "tta": args.tta,
        "stain_normalize": args.stain_normalize,
        "predict_set": args.predict_set,
        "overrides": args.overrides,
        "budget": budget_text(args.steps, args.max_minutes, args.overrides),
        "max_minutes": args.max_minutes,
        "ldiffusion": ldiffusion.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "command": "python benchmarks/accuracy.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "conventions": {},
        "results": [],
    }
    failed = False
    for ds in args.datasets:
        spec = DATASETS.get(ds)
        data = dirs.get(ds) or args.data_cache.expanduser() / cache_name(ds, args.seed)
        if ds not in dirs:
            assert spec is not None
            rec = run(["data", "prepare", spec.converter, str(args.shared_data / spec.source), str(data),
                       "--seed", str(args.seed), "--no-progress"])
            if rec.get("error"):
                failed = True
                res["results"].append({"dataset": ds, "error": f"data prepare failed: {rec['error']}"})
                continue
        if spec is None:  # a prepared folder from --dataset-dir: foreground (+ instances when present)
            flags = ["--foreground-only"] + (["--instances"] if (data / "instances").is_dir() else [])
            spec = DatasetSpec("-", str(data), tuple(flags), note="prepared folder given with --dataset-dir")
        res["conventions"][ds] = {"flags": " ".join(spec.eval_flags), "note": spec.note, "data": str(data)}
        for method in args.methods:
            tag = f"-{args.tag}" if args.tag else ""
            out_run = args.runs / ds / f"{method}-{args.preset}-seed{args.seed}{tag}"
            entry: dict[str, Any] = {"dataset": ds, "method": method, "tag": args.tag, "run": str(out_run),
                                     "commands": []}
            res["results"].append(entry)
            sets = budget_overrides(method, args.steps) + method_overrides(method, args.overrides)
            if args.reuse_runs and _finished(out_run):
                print(f"# reusing {out_run} (--reuse-runs)", flush=True)
            else:
                cmd = ["train", "--method", method, "--data", str(data), "--out", str(out_run),
                       "--preset", args.preset, "--seed", str(args.seed), "--device", args.device]
                if args.max_minutes is not None:
                    cmd += ["--max-minutes", f"{args.max_minutes:g}"]
                if args.annotated_fraction is not None:
                    cmd += ["--annotated-fraction", f"{args.annotated_fraction:g}"]
                for minutes in args.snapshot_minutes:
                    cmd += ["--snapshot-minutes", f"{minutes:g}"]
                for s in sets:
                    cmd += ["--set", s]
                if (args.resume or args.reuse_runs) and (out_run / "train_state.pt").is_file():
                    cmd.append("--resume")
                cmd.append("--no-progress")
                rec = run(cmd)
                entry["commands"].append(rec)
                entry["train_s"] = rec.get("wall_s")
                if rec.get("error"):
                    failed = True
                    entry["error"] = f"train failed: {rec['error']}"
                    continue
                if not args.dry_run:
                    _write(out_run / "train_time.json", json.dumps({"wall_s": rec.get("wall_s")}) + "\n")
            if entry.get("train_s") is None and not args.dry_run:
                entry["train_s"] = _train_seconds(out_run)
            entry["val_score"] = _best_val(out_run)
            if not args.dry_run:
                entry.update(_training_extent(out_run))
            if not score_run(run, args, spec, data, out_run, entry):
                failed = True
            for minutes in args.snapshot_minutes:
                snap = out_run / "snapshots" / f"{minutes:g}min"
                if not (snap / "snapshot.json").is_file():
                    if not args.dry_run:
                        print(f"# no snapshot at {minutes:g} min in {out_run} (run shorter than that)",
                              flush=True)
                    continue
                info = json.loads((snap / "snapshot.json").read_text())
                point: dict[str, Any] = {"dataset": ds, "method": method, "tag": args.tag, "run": str(snap),
                                         "snapshot_minutes": minutes, "train_s": info["elapsed_s"],
                                         "steps": info["step"], "val_score": info["best_score"],
                                         "commands": []}
                point.update(_training_extent(out_run, steps=info["step"]))
                res["results"].append(point)
                if not score_run(run, args, spec, data, snap, point):
                    failed = True
    res["run_time_s"] = round(time.perf_counter() - t0, 1)
    if args.dry_run:
        print(f"# dry run: {len(run.log)} commands; nothing was run or written", flush=True)
        return 0
    _write(out, json.dumps(res, indent=1) + "\n")
    md = out.with_suffix(".md")
    _write(md, markdown(res))
    print(markdown(res))
    print(f"wrote {out} and {md} ({res['run_time_s']:.0f} s)")
    return 1 if failed else 0


def score_run(run: Any, args: argparse.Namespace, spec: DatasetSpec, data: Path, out_run: Path,
              entry: dict[str, Any]) -> bool:
    """Predict the test split with the run folder `out_run` and score it into `entry`; False on a failure."""
    ok = True
    suffix = ("-tta" if args.tta else "") + ("-stainnorm" if args.stain_normalize else "")
    suffix += "".join("-" + kv.replace("=", "-") for kv in args.predict_set)
    pred = out_run / f"pred-test{suffix}"
    if args.reuse_runs and _predicted(pred, data):
        print(f"# reusing the predictions in {pred} (--reuse-runs)", flush=True)
    else:
        cmd = ["predict", str(out_run), "--data", str(data), "--split", "test", "--out", str(pred),
               "--seed", str(args.seed), "--device", args.device, "--no-progress"]
        if args.batch_size is not None:
            cmd += ["--batch-size", str(args.batch_size)]
        if args.tta:
            cmd.append("--tta")
        if args.stain_normalize:
            cmd += ["--stain-normalize", str(data)]
        for kv in args.predict_set:
            cmd += ["--set", kv]
        rec = run(cmd)
        entry["commands"].append(rec)
        entry["predict_s"] = rec.get("wall_s")
        if rec.get("error"):
            entry["error"] = f"predict failed: {rec['error']}"
            return False
        if not args.dry_run:
            _write(pred / "predict_time.json", json.dumps({"wall_s": rec.get("wall_s")}) + "\n")
    if entry.get("predict_s") is None and (pred / "predict_time.json").is_file():
        entry["predict_s"] = json.loads((pred / "predict_time.json").read_text()).get("wall_s")
    entry["scores"] = {}
    scorings = [(part, part, ()) for part in spec.parts] + list(spec.extra)
    for label, part, extra_flags in scorings:
        metrics_path = out_run / f"metrics-{label}{suffix}.json"
        rec = run(["evaluate", "--pred", str(pred), "--data", str(data), "--split", part,
                   "--out", str(metrics_path), *spec.eval_flags, *extra_flags, "--no-progress"])
        entry["commands"].append(rec)
        if rec.get("error"):
            ok = False
            entry["scores"][label] = {"error": rec["error"]}
        elif not args.dry_run:
            full = json.loads(metrics_path.read_text())
            entry["scores"][label] = headline(full)
    return ok


def _train_seconds(run: Path) -> float | None:
    """Training wall time of a finished run.

    From `train_time.json` (written by the `train` command), else the fit time logged.
    """
    if (run / "train_time.json").is_file():
        return json.loads((run / "train_time.json").read_text()).get("wall_s")
    last = None
    if (run / "metrics.jsonl").is_file():
        for line in (run / "metrics.jsonl").read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("type") == "stage_end":
                last = rec.get("elapsed_s")
    return last


def _predicted(pred: Path, data: Path) -> bool:
    """True when `pred` holds a class map for every test id of `data` (a finished `ldiffusion predict`)."""
    if not pred.is_dir() or not (pred / "predict_time.json").is_file():
        return False
    ids = json.loads((data / "dataset.json").read_text())["splits"].get("test", [])
    return bool(ids) and all((pred / f"{i}.png").is_file() for i in ids)


def _finished(run: Path) -> bool:
    """True when `run` holds weights and its log ends every stage (a completed `ldiffusion train`)."""
    if not (run / "model.safetensors").is_file() or not (run / "config.resolved.json").is_file():
        return False
    stages = [s["name"] for s in json.loads((run / "config.resolved.json").read_text()).get("stages", [])]
    ended = set()
    log = run / "metrics.jsonl"
    if log.is_file():
        for line in log.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("type") == "stage_end":
                ended.add(rec.get("stage"))
    return all(s in ended for s in stages)


if __name__ == "__main__":
    sys.exit(main())
