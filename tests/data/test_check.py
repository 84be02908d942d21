"""`data.check.validate`: one test per problem kind, each naming the offending file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ldiffusion.cli import main
from ldiffusion.data.check import Problem, format_problems, validate
from ldiffusion.data.format import write_png


@pytest.fixture
def root(synth_root: Path, tmp_path: Path) -> Path:
    """A private copy of the session synthetic set that a test may break."""
    dst = tmp_path / "ds"
    shutil.copytree(synth_root, dst)
    return dst


def _meta(root: Path) -> dict:
    return json.loads((root / "dataset.json").read_text())


def _save_meta(root: Path, meta: dict) -> None:
    (root / "dataset.json").write_text(json.dumps(meta))


def _first(root: Path, split: str = "train") -> str:
    return _meta(root)["splits"][split][0]


def _errors(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.level == "error"]


def test_clean_synthetic_set_has_no_problems(synth_root: Path) -> None:
    assert validate(synth_root) == []


def test_missing_dataset_json(root: Path) -> None:
    (root / "dataset.json").unlink()
    problems = validate(root)
    assert len(problems) == 1
    assert problems[0].path == str(root / "dataset.json")
    assert "not found" in problems[0].message


def test_invalid_dataset_json(root: Path) -> None:
    (root / "dataset.json").write_text("{not json")
    problems = validate(root)
    assert [p.path for p in problems] == [str(root / "dataset.json")]
    assert "JSON" in problems[0].message


def test_dataset_json_schema_error_names_key(root: Path) -> None:
    meta = _meta(root)
    del meta["classes"]
    _save_meta(root, meta)
    (p,) = validate(root)
    assert p.path.endswith("dataset.json") and "classes" in p.message


def test_missing_image_and_label_named(root: Path) -> None:
    a, b = _meta(root)["splits"]["train"][:2]
    (root / "images" / f"{a}.png").unlink()
    (root / "labels" / f"{b}.png").unlink()
    problems = _errors(validate(root))
    paths = {p.path for p in problems}
    assert str(root / "images" / f"{a}.png") in paths
    assert str(root / "labels" / f"{b}.png") in paths
    assert len(problems) == 2  # every problem, not just the first


def test_unreadable_image_and_label(root: Path) -> None:
    a = _first(root)
    (root / "images" / f"{a}.png").write_bytes(b"not a png")
    (root / "labels" / f"{a}.png").write_bytes(b"garbage")
    problems = _errors(validate(root))
    msgs = {p.path: p.message for p in problems}
    assert "unreadable image" in msgs[str(root / "images" / f"{a}.png")]
    assert "unreadable label" in msgs[str(root / "labels" / f"{a}.png")]


def test_size_mismatch_names_both_sizes(root: Path) -> None:
    a = _first(root)
    write_png(root / "labels" / f"{a}.png", np.zeros((32, 48), np.uint8))
    problems = _errors(validate(root))
    (p,) = [p for p in problems if "label size" in p.message]
    assert p.path == str(root / "labels" / f"{a}.png")
    assert "(32, 48)" in p.message and "(64, 64)" in p.message


def test_label_values_outside_classes(root: Path) -> None:
    a = _first(root)
    lab = np.zeros((64, 64), np.uint8)
    lab[0, 0], lab[0, 1], lab[0, 2] = 7, 9, 255  # 255 = ignore_index is allowed
    write_png(root / "labels" / f"{a}.png", lab)
    (p,) = _errors(validate(root))
    assert p.path == str(root / "labels" / f"{a}.png")
    assert "[7, 9]" in p.message


def test_instance_size_mismatch(root: Path) -> None:
    a = _first(root)
    write_png(root / "instances" / f"{a}.png", np.zeros((10, 64), np.uint16))
    (p,) = _errors(validate(root))
    assert p.path == str(root / "instances" / f"{a}.png")
    assert "(10, 64)" in p.message


def test_duplicate_ids_within_and_across_splits(root: Path) -> None:
    meta = _meta(root)
    a = meta["splits"]["train"][0]
    b = meta["splits"]["val"][0]
    meta["splits"]["train"].append(a)
    meta["splits"]["test"].append(b)
    _save_meta(root, meta)
    msgs = [p.message for p in validate(root)]
    assert any("more than once" in m and a in m for m in msgs)
    assert any("more than one split" in m and b in m for m in msgs)


def test_empty_split_named(root: Path) -> None:
    meta = _meta(root)
    moved = meta["splits"]["val"]
    meta["splits"]["val"] = []
    meta["splits"]["train"] += moved
    _save_meta(root, meta)
    (p,) = validate(root)
    assert p.path == str(root / "dataset.json") and "'val'" in p.message and "empty" in p.message


def test_orphan_files_reported_as_warning(root: Path) -> None:
    shutil.copy(root / "images" / f"{_first(root)}.png", root / "images" / "stray.png")
    (p,) = validate(root)
    assert p.level == "warning" and p.path == str(root / "images" / "stray.png")
    assert "no split" in p.message


def test_parts_ids_not_in_splits(root: Path) -> None:
    meta = _meta(root)
    meta["parts"] = {"testA": [meta["splits"]["test"][0], "ghost"]}
    _save_meta(root, meta)
    (p,) = validate(root)
    assert "testA" in p.message and "ghost" in p.message


def test_format_problems_one_line_each() -> None:
    text = format_problems([Problem("a.png", "bad"), Problem("b.png", "odd", level="warning")])
    assert text.splitlines() == ["a.png: bad", "b.png: warning: odd"]


def test_cli_check_ok(synth_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "check", str(synth_root)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK: synth, 24 images (train ") and "5 classes" in out


def test_cli_check_problems_exit_2(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _first(root)
    (root / "labels" / f"{a}.png").unlink()
    rc = main(["data", "check", str(root)])
    out = capsys.readouterr().out
    assert f"{root / 'labels' / (a + '.png')}: missing label file" in out
    assert rc == 2
