"""`ldiffusion evaluate`: JSON output, printed table, exit 2 on a missing or wrong-size prediction."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ldiffusion.cli import main
from ldiffusion.data.format import write_png
from tests.eval.test_report import make_tiny_dataset, write_predictions


def test_evaluate_writes_json_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_tiny_dataset(tmp_path / "ds")
    pred = write_predictions(tmp_path / "pred")
    out = tmp_path / "res" / "metrics.json"
    rc = main(["evaluate", "--pred", str(pred), "--data", str(root), "--out", str(out),
               "--foreground-only", "--instances", "--no-progress"])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["n_images"] == 2 and r["split"] == "test" and r["semantic"]["foreground_only"]
    assert "foreground classes only" in r["convention"]
    assert len(r["semantic"]["per_class"]) == 3 and "instance" in r

    def fractions(d: object) -> None:
        if isinstance(d, dict):
            for k, v in d.items():
                if k in ("dice", "miou", "mpa", "fwiou", "iou", "aji", "pq", "dq", "sq") and v is not None:
                    assert 0 <= v <= 1, (k, v)
                fractions(v)
        elif isinstance(d, list):
            for v in d:
                fractions(v)

    fractions(r)
    text = capsys.readouterr().out
    assert "DICE" in text and "FwIoU" in text and str(out) in text


def test_evaluate_exit_2_missing_prediction(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_tiny_dataset(tmp_path / "ds")
    pred = write_predictions(tmp_path / "pred")
    (pred / "x.png").unlink()
    out = tmp_path / "m.json"
    rc = main(["evaluate", "--pred", str(pred), "--data", str(root), "--out", str(out), "--no-progress"])
    assert rc == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "x.png" in err and "missing prediction" in err and len(err.strip().splitlines()) == 1


def test_evaluate_exit_2_wrong_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_tiny_dataset(tmp_path / "ds")
    pred = write_predictions(tmp_path / "pred")
    write_png(pred / "y.png", np.zeros((8, 4), np.uint8))
    rc = main(["evaluate", "--pred", str(pred), "--data", str(root), "--out", str(tmp_path / "m.json"),
               "--no-progress"])
    assert rc == 2
    assert "y.png: size 4x8" in capsys.readouterr().err


def test_evaluate_exit_2_unknown_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_tiny_dataset(tmp_path / "ds")
    pred = write_predictions(tmp_path / "pred")
    rc = main(["evaluate", "--pred", str(pred), "--data", str(root), "--out", str(tmp_path / "m.json"),
               "--split", "tset", "--no-progress"])
    assert rc == 2 and "tset" in capsys.readouterr().err
