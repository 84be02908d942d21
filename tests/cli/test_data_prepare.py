"""`ldiffusion data prepare` on a small generated folder data set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldiffusion.cli import main


def _src(root: Path, n: int = 8) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for k in range(n):
        m = np.zeros((8, 8), dtype=np.uint8)
        m[: k % 4 + 1] = 255
        Image.fromarray(np.full((8, 8, 3), 20 * k, dtype=np.uint8)).save(root / "images" / f"c{k}.png")
        Image.fromarray(m).save(root / "masks" / f"c{k}.png")
    return root


def test_prepare_skip_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, out = _src(tmp_path / "src"), tmp_path / "out"
    args = ["data", "prepare", "folder", str(src), str(out), "--no-progress", "-o", "mapping=0=0,255=1",
            "--option", "names=bg,fg"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "train 6, val 1, test 1" in text and "0=bg, 1=fg" in text
    man = json.loads((out / "manifest.json").read_text())
    assert man["converter"] == "folder" and man["options"]["seed"] == 0
    assert man["options"]["mapping"] == "0=0,255=1"
    mtime = (out / "manifest.json").stat().st_mtime_ns
    assert main(args) == 0
    assert "skipping" in capsys.readouterr().out
    assert (out / "manifest.json").stat().st_mtime_ns == mtime
    assert main([*args, "--seed", "1"]) == 0  # other options: converted again
    assert "skipping" not in capsys.readouterr().out
    assert main([*args, "--seed", "1", "--force"]) == 0
    assert "prepared" in capsys.readouterr().out


def test_prepare_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "prepare", "nope", str(tmp_path), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "monuseg" in err and "glas" in err
    missing = tmp_path / "missing_src"
    assert main(["data", "prepare", "glas", str(missing), str(tmp_path / "o")]) == 2
    assert str(missing) in capsys.readouterr().err
    src = _src(tmp_path / "src")
    assert main(["data", "prepare", "folder", str(src), str(tmp_path / "o"), "-o", "colour=1"]) == 2
    assert "valid options" in capsys.readouterr().err


def test_help_lists_formats(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "prepare", "--help"]) == 0
    out = capsys.readouterr().out
    for name in ("adp", "bcss", "consep-tiles", "folder", "glas", "monuseg", "pannuke", "wsss4luad"):
        assert name in out
