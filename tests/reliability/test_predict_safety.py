"""Issue 17, predict side: ids and --out never reach files outside --out; predict never overwrites the
inputs, a data set, or files it did not write. Each case: exit code 2, one line naming the culprit,
and every file on disk unchanged (sha256 before and after).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from ldiffusion.cli import main
from ldiffusion.core.errors import LDiffusionError

pytestmark = pytest.mark.e2e


def tree_hashes(*roots: Path) -> dict[str, str]:
    """sha256 of every file under `roots` (path -> digest)."""
    out = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def one_line_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory, synth_root) -> Path:
    run = tmp_path_factory.mktemp("run") / "run"
    args = ["train", "--method", "unet", "--data", str(synth_root), "--out", str(run), "--preset", "tiny",
            "--set", "steps=2", "--set", "base=4", "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    return run


@pytest.fixture
def data(synth_root, tmp_path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    return root


def predict(run, *args) -> int:
    return main(["predict", str(run), *map(str, args), "--no-progress", "--device", "cpu"])


@pytest.mark.parametrize("bad_id", ["../../outside/victim", "ABS"])
def test_traversal_or_absolute_id_touches_nothing_outside(run, data, tmp_path, capsys, bad_id):
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.png"
    shutil.copy(next((data / "images").iterdir()), victim)
    if bad_id == "ABS":
        bad_id = str(outside / "victim")
    info = json.loads((data / "dataset.json").read_text())
    info["splits"]["test"] = [bad_id]
    (data / "dataset.json").write_text(json.dumps(info))
    out = tmp_path / "pred"
    before = tree_hashes(tmp_path)
    assert predict(run, "--data", data, "--out", out) == 2
    line = one_line_error(capsys)
    assert "dataset.json" in line and "id '" in line and "not valid" in line  # long ids may be elided
    assert tree_hashes(tmp_path) == before
    assert sorted(p.name for p in outside.iterdir()) == ["victim.png"]
    assert not out.exists() or not any(out.iterdir())


def test_check_case_id_refuses_what_the_loader_might_let_through(tmp_path):
    from ldiffusion.infer.outputs import check_case_id, output_path

    for bad in ("../x", "/abs/x", "a\\b", "..", "", "a/b"):
        with pytest.raises(LDiffusionError, match="not valid"):
            check_case_id(bad, tmp_path / "dataset.json")
    assert check_case_id("case_01", "x") == "case_01"
    with pytest.raises(LDiffusionError, match="outside"):
        (tmp_path / "o").mkdir()
        (tmp_path / "o" / "link.png").symlink_to(tmp_path / "elsewhere.png")
        output_path(tmp_path / "o", "link.png")


def test_out_same_as_input_folder_refused(run, data, tmp_path, capsys):
    images = tmp_path / "imgs"
    shutil.copytree(data / "images", images)
    before = tree_hashes(images)
    assert predict(run, images, "--out", images) == 2
    line = one_line_error(capsys)
    assert str(images) in line and "input" in line
    assert tree_hashes(images) == before


@pytest.mark.parametrize("sub", ["", "images", "labels", "labels/nested"])
def test_out_inside_data_set_refused(run, data, capsys, sub):
    before = tree_hashes(data)
    out = data / sub if sub else data
    assert predict(run, "--data", data, "--out", out) == 2
    assert "data set" in one_line_error(capsys)
    assert tree_hashes(data) == before


def test_foreign_files_in_out_kept_without_overwrite(run, data, tmp_path, capsys):
    test_ids = json.loads((data / "dataset.json").read_text())["splits"]["test"]
    out = tmp_path / "pred"
    out.mkdir()
    mine = out / f"{test_ids[0]}.png"
    mine.write_bytes(b"months of manual work")
    before = tree_hashes(out)
    assert predict(run, "--data", data, "--out", out) == 2
    line = one_line_error(capsys)
    assert str(mine) in line and "--overwrite" in line
    assert tree_hashes(out) == before
    # its own outputs are replaced on a rerun (no flag needed); --overwrite replaces foreign files
    assert predict(run, "--data", data, "--out", out, "--overwrite") == 0
    assert mine.read_bytes() != b"months of manual work"
    assert predict(run, "--data", data, "--out", out) == 0
    owned = json.loads((out / "predict.json").read_text())["files"]
    assert f"{test_ids[0]}.png" in owned and f"{test_ids[0]}_overlay.png" in owned


def test_ids_whose_outputs_collide_are_refused(run, data, tmp_path, capsys):
    a = data / "images" / "a.png"
    shutil.copy(next((data / "images").iterdir()), a)
    shutil.copy(a, tmp_path / "a_overlay.png")
    before = tree_hashes(tmp_path)
    assert predict(run, a, tmp_path / "a_overlay.png", "--out", tmp_path / "pred") == 2
    assert "a_overlay.png" in one_line_error(capsys)
    assert tree_hashes(tmp_path) == before


def test_out_is_a_file_refused(run, data, tmp_path, capsys):
    f = tmp_path / "metrics.json"
    f.write_text("{}")
    assert predict(run, "--data", data, "--out", f) == 2
    assert str(f) in one_line_error(capsys)
    assert f.read_text() == "{}"


def test_feature_cache_refuses_traversal_id(tmp_path):
    from ldiffusion.methods import create_method

    cache = tmp_path / "a" / "b" / "cache"
    m = create_method("ldiffusion", preset="tiny", num_classes=2, overrides=[f"feature_cache={cache}"])
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for bad in ("../../escape", str(tmp_path / "abs")):
        with pytest.raises(LDiffusionError, match="not valid"):
            m._train_features(x, [bad])
    assert [p.name for p in tmp_path.rglob("*.pt")] == []


@pytest.mark.parametrize("target", ["dataset.json", "labels/x.png", "images"])
def test_evaluate_out_cannot_overwrite_the_data_set(data, tmp_path, capsys, target):
    before = tree_hashes(data)
    out = data / target
    if target == "labels/x.png":
        out = next((data / "labels").iterdir())
    assert main(["evaluate", "--pred", str(tmp_path), "--data", str(data), "--out", str(out)]) == 2
    assert str(out) in one_line_error(capsys)
    assert tree_hashes(data) == before
