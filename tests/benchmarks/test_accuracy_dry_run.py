"""benchmarks/accuracy.py: the printed commands (dry run) and one tiny real run on the synthetic set."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "accuracy.py"


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_dry_run_prints_the_user_commands(tmp_path):
    proc = _run("--dry-run", "--datasets", "monuseg", "glas", "--methods", "unet", "ldiffusion",
                "--steps", "7", "--max-minutes", "3", "--set", "ldiffusion:val_every=0",
                "--data-cache", str(tmp_path / "cache"), "--runs", str(tmp_path / "runs"),
                "--shared-data", "/nonexistent/shared", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cmds = [x[2:] for x in proc.stdout.splitlines() if x.startswith("$ ")]
    # per data set: prepare; per method: train, predict, evaluate (MoNuSeg: test and test with watershed
    # instances; GlaS: test, testA, testB)
    assert len(cmds) == (1 + 2 * 4) + (1 + 2 * 5)
    prepared = tmp_path / "cache" / "monuseg"
    src = "/nonexistent/shared/monuseg"
    assert cmds[0] == f"ldiffusion data prepare monuseg {src} {prepared} --seed 0 --no-progress"
    train_unet, train_ld = (c for c in cmds if c.startswith("ldiffusion train") and "monuseg" in c)
    assert "--set steps=7 --set epochs=null" in train_unet and "--max-minutes 3" in train_unet
    assert "val_every" not in train_unet  # a method-prefixed --set goes to that method only
    for key in ("ae_steps=7", "diffusion_steps=7", "seg_steps=7", "seg_epochs=null", "val_every=0"):
        assert f"--set {key}" in train_ld
    evals = [c for c in cmds if c.startswith("ldiffusion evaluate")]
    assert all("--foreground-only --instances" in c for c in evals if "monuseg" in c)
    assert sum("--watershed" in c for c in evals if "monuseg" in c) == 2
    assert [c.split("--split ")[1].split()[0] for c in evals if "glas" in c] == ["test", "testA", "testB"] * 2
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_each_seed_prepares_its_own_folder(tmp_path):
    # the converters draw the validation split with the seed: seed 1 must not convert over seed 0's folder
    cmds = {}
    for seed in ("0", "1"):
        proc = _run("--dry-run", "--datasets", "glas", "--methods", "unet", "--seed", seed,
                    "--data-cache", str(tmp_path / "cache"), "--shared-data", "/nonexistent/shared",
                    cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        cmds[seed] = [x[2:] for x in proc.stdout.splitlines() if x.startswith("$ ")]
    assert cmds["0"][0].split()[5] == str(tmp_path / "cache" / "glas")
    assert cmds["1"][0].split()[5] == str(tmp_path / "cache" / "glas-seed1")
    assert all(str(tmp_path / "cache" / "glas-seed1") in c for c in cmds["1"][1:] if "--data" in c)


def test_unknown_dataset_is_an_error(tmp_path):
    proc = _run("--dry-run", "--datasets", "monusegg", cwd=tmp_path)
    assert proc.returncode != 0 and "unknown data set" in proc.stderr


def test_tiny_real_run_and_reuse(synth_root, tmp_path):
    args = ["--datasets", "synth", "--dataset-dir", f"synth={synth_root}", "--methods", "unet", "--preset",
            "tiny", "--steps", "3", "--device", "cpu", "--runs", str(tmp_path / "runs")]
    proc = _run(*args, "--out", str(tmp_path / "res.json"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((tmp_path / "res.json").read_text())
    (entry,) = res["results"]
    assert entry["dataset"] == "synth" and entry["method"] == "unet"
    scores = entry["scores"]["test"]
    assert 0.0 <= scores["dice"] <= 1.0 and "aji" in scores and "pq" in scores
    assert [c["command"].split()[1] for c in entry["commands"]] == ["train", "predict", "evaluate"]
    assert "| synth | test | unet (3 steps) |" in (tmp_path / "res.md").read_text()
    # the training extent of the last stage: steps from the log, batch size from the resolved config
    resolved = json.loads((Path(entry["run"]) / "config.resolved.json").read_text())
    assert entry["steps"] == 3 and entry["batch_size"] == resolved["stages"][-1]["batch_size"]
    assert entry["crops"] == 3 * entry["batch_size"]

    proc = _run(*args, "--reuse-runs", "--out", str(tmp_path / "res2.json"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "# reusing" in proc.stdout
    (entry2,) = json.loads((tmp_path / "res2.json").read_text())["results"]
    # finished runs and complete prediction folders are reused: only scoring runs again
    assert [c["command"].split()[1] for c in entry2["commands"]] == ["evaluate"]
    assert "# reusing the predictions" in proc.stdout
    assert entry2["scores"]["test"]["dice"] == scores["dice"]
    assert entry2["predict_s"] == entry["predict_s"]


def test_snapshot_rows_are_scored(synth_root, tmp_path):
    proc = _run("--datasets", "synth", "--dataset-dir", f"synth={synth_root}", "--methods", "unet",
                "--preset", "tiny", "--steps", "3", "--device", "cpu", "--runs", str(tmp_path / "runs"),
                "--snapshot-minutes", "1e-07", "1e9", "--out", str(tmp_path / "res.json"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    full, point = json.loads((tmp_path / "res.json").read_text())["results"]
    assert point["snapshot_minutes"] == 1e-07 and point["steps"] == 1 and full.get("snapshot_minutes") is None
    assert point["crops"] == point["batch_size"] == full["batch_size"]
    assert full["crops"] == 3 * full["batch_size"]
    assert point["run"].endswith("snapshots/1e-07min")
    assert [c["command"].split()[1] for c in point["commands"]] == ["predict", "evaluate"]
    assert 0.0 <= point["scores"]["test"]["dice"] <= 1.0
    assert "no snapshot at 1e+09 min" in proc.stdout
    assert "unet @ 1e-07 min (1 steps)" in (tmp_path / "res.md").read_text()


def test_the_budget_text_names_stage_budgets_given_as_overrides():
    import importlib.util

    spec = importlib.util.spec_from_file_location("accuracy_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules[spec.name]
    assert mod.budget_text(None, None, []) == "the preset's step counts"
    assert mod.budget_text(7, 3.0, []) == "7 optimiser steps per stage, at most 3 min per stage"
    text = mod.budget_text(None, None, ["ldiffusion:seg_max_minutes=13", "ldiffusion:val_every=100"])
    assert text == "ldiffusion:seg_max_minutes = 13 min"
