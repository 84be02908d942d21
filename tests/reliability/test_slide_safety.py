"""Issue 17, slide side: bad slides and arguments end in exit 2 and one line naming the file or value,
with nothing on disk changed; no allocation beyond --max-memory; a resume never mixes two models;
files `slide predict` did not write are kept; a slide without resolution metadata warns.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

tifffile = pytest.importorskip("tifffile")
pytest.importorskip("tiffslide")
pytest.importorskip("zarr")
pytest.importorskip("shapely")

import ldiffusion.methods as methods  # noqa: E402
from ldiffusion.cli import main  # noqa: E402
from ldiffusion.infer.slide import open_slide  # noqa: E402

MPP = 0.5
ARGS = ["--tile", "64", "--overlap", "8", "--batch-size", "2", "--no-progress", "--device", "cpu"]


class ConstantModel:
    """Constant probabilities; with `crash_after=n` it fails after n batches (an interrupted run)."""

    num_classes = 2

    def __init__(self, crash_after: int | None = None):
        self.calls, self.crash_after = 0, crash_after

    def predict_proba(self, images, *, generator=None):
        if self.crash_after is not None and self.calls >= self.crash_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        b, _, h, w = images.shape
        return torch.tensor([0.3, 0.7]).view(1, 2, 1, 1).expand(b, 2, h, w).clone()


def tissue_image(h: int = 256, w: int = 256) -> np.ndarray:
    img = np.full((h, w, 3), 240, np.uint8)
    img[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = (200, 80, 160)
    return img


def write_slide(path: Path, img: np.ndarray, *, mpp: float | None = MPP, **kw) -> Path:
    res = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"} if mpp else {}
    photometric = "rgb" if img.ndim == 3 else "minisblack"
    tifffile.imwrite(path, img, photometric=photometric, **res, **kw)
    return path


def tree_hashes(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        root = Path(root)
        files = [root] if root.is_file() else sorted(root.rglob("*")) if root.exists() else []
        for p in files:
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def one_line_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


@pytest.fixture
def fake_run(tmp_path, monkeypatch):
    """Two run folders with different weights; `load_segmenter` returns `model[0]`."""
    runs = []
    for i in (1, 2):
        run = tmp_path / f"run{i}"
        run.mkdir()
        (run / "config.json").write_text('{"method": "fake"}')
        (run / "model.safetensors").write_bytes(bytes([i]) * 64)
        runs.append(run)
    model = [ConstantModel()]
    monkeypatch.setattr(methods, "load_segmenter", lambda run, device, **kw: model[0])
    return runs, model


def slide_predict(run, *args) -> int:
    return main(["slide", "predict", str(run), *map(str, args), *ARGS])


def test_truncated_tiff_exit_2_names_file(tmp_path, fake_run, capsys):
    good = write_slide(tmp_path / "good.tif", tissue_image())
    data = good.read_bytes()
    bad = tmp_path / "trunc.tif"
    bad.write_bytes(data[: len(data) // 2])
    before = tree_hashes(tmp_path)
    assert slide_predict(fake_run[0][0], bad, "--out", tmp_path / "out") == 2
    line = one_line_error(capsys)
    assert str(bad) in line and "truncated or corrupt" in line
    assert {k: v for k, v in tree_hashes(tmp_path).items() if "/out/" not in k} == before
    assert not (tmp_path / "out" / "trunc" / "done.json").exists()


def test_grey_tiff_is_read_as_rgb(tmp_path, fake_run, capsys):
    grey = write_slide(tmp_path / "grey.tif", tissue_image()[..., 0])
    with open_slide(grey) as s:
        region = s.read_region(0, 0, 256, 256)
    assert region.shape == (256, 256, 3)
    assert (region[..., 0] == region[..., 1]).all() and (region[..., 1] == region[..., 2]).all()
    assert region[128, 128, 0] == 200 and region[0, 0, 0] == 240
    assert slide_predict(fake_run[0][0], grey, "--out", tmp_path / "out") == 0
    assert (tmp_path / "out" / "grey" / "done.json").is_file()


def test_sixteen_bit_tiff_refused(tmp_path, fake_run, capsys):
    s16 = write_slide(tmp_path / "s16.tif", tissue_image().astype(np.uint16) * 257)
    assert slide_predict(fake_run[0][0], s16, "--out", tmp_path / "out") == 2
    line = one_line_error(capsys)
    assert str(s16) in line and "uint16" in line


def test_target_mpp_1000_refused_with_the_figure(tmp_path, fake_run, capsys):
    slide = write_slide(tmp_path / "s.tif", tissue_image())
    assert slide_predict(fake_run[0][0], slide, "--out", tmp_path / "out", "--target-mpp", "1000") == 2
    line = one_line_error(capsys)
    # a 64-px tile at 2000 level-0 px per px: 128000 x 128000 x 3 bytes = 45.8 GiB
    assert str(slide) in line and "target_mpp=1000" in line and "45.8 GiB" in line and "--max-memory" in line
    assert not (tmp_path / "out" / "s").exists()


@pytest.mark.parametrize("value", ["0", "-1"])
def test_target_mpp_not_positive_refused(tmp_path, fake_run, capsys, value):
    slide = write_slide(tmp_path / "s.tif", tissue_image())
    assert slide_predict(fake_run[0][0], slide, "--out", tmp_path / "out", "--target-mpp", value) == 2
    assert "target_mpp" in one_line_error(capsys)


def test_declared_100k_tiff_refused_before_allocating(tmp_path, fake_run, capsys):
    """A 12 kB TIFF whose tags declare one 100000 x 100000 RGB strip (28 GiB to decode)."""
    huge = write_slide(tmp_path / "huge.tif", tissue_image(64, 64), rowsperstrip=64)
    with tifffile.TiffFile(huge, mode="r+b") as tif:
        for tag in ("ImageWidth", "ImageLength", "RowsPerStrip"):
            tif.pages[0].tags[tag].overwrite(100_000, dtype="I")
    before = tree_hashes(tmp_path)
    assert slide_predict(fake_run[0][0], huge, "--out", tmp_path / "out") == 2
    line = one_line_error(capsys)
    assert str(huge) in line and "27.9 GiB" in line and "100000 x 100000" in line
    assert tree_hashes(tmp_path) == before


def test_out_is_a_file_refused(tmp_path, fake_run, capsys):
    slide = write_slide(tmp_path / "s.tif", tissue_image())
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    assert slide_predict(fake_run[0][0], slide, "--out", out) == 2
    assert str(out) in one_line_error(capsys)
    assert out.read_text() == "keep me"


def test_slide_folder_is_a_file_refused(tmp_path, fake_run, capsys):
    slide = write_slide(tmp_path / "s.tif", tissue_image())
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "s").write_text("keep me")
    assert slide_predict(fake_run[0][0], slide, "--out", tmp_path / "out") == 2
    assert str(tmp_path / "out" / "s") in one_line_error(capsys)
    assert (tmp_path / "out" / "s").read_text() == "keep me"


def test_foreign_files_in_slide_folder_kept_without_overwrite(tmp_path, fake_run, capsys):
    slide = write_slide(tmp_path / "s.tif", tissue_image())
    folder = tmp_path / "out" / "s"
    folder.mkdir(parents=True)
    (folder / "labels.ome.tif").write_bytes(b"someone's curated labels")
    (folder / ".work").mkdir()
    (folder / ".work" / "notes.txt").write_text("not ours")
    before = tree_hashes(tmp_path / "out")
    assert slide_predict(fake_run[0][0], slide, "--out", tmp_path / "out") == 2
    line = one_line_error(capsys)
    assert str(folder / "labels.ome.tif") in line and "--overwrite" in line
    assert tree_hashes(tmp_path / "out") == before
    assert slide_predict(fake_run[0][0], slide, "--out", tmp_path / "out", "--overwrite") == 0
    assert (folder / "done.json").is_file()
    # a finished slide is its own: a rerun skips it, --overwrite redoes it, no refusal
    assert slide_predict(fake_run[0][0], slide, "--out", tmp_path / "out") == 0
    assert slide_predict(fake_run[0][0], slide, "--out", tmp_path / "out", "--overwrite") == 0


def test_resume_with_another_model_refused(tmp_path, fake_run, capsys):
    (run1, run2), model = fake_run
    slide = write_slide(tmp_path / "s.tif", tissue_image())
    out = tmp_path / "out"
    model[0] = ConstantModel(crash_after=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        slide_predict(run1, slide, "--out", out, "--no-tissue")
    state = out / "s" / ".work" / "state.json"
    assert json.loads(state.read_text())["batches_done"] == 2
    before = tree_hashes(out)
    model[0] = ConstantModel()
    assert slide_predict(run2, slide, "--out", out, "--no-tissue", "--resume") == 2
    line = one_line_error(capsys)
    assert str(state) in line and "another model" in line
    assert tree_hashes(out) == before
    # the run that started the slide resumes from its 2 finished batches
    assert slide_predict(run1, slide, "--out", out, "--no-tissue", "--resume") == 0
    done = json.loads((out / "s" / "done.json").read_text())
    assert len(done["params"]["model_fingerprint"]) == 64


def test_missing_resolution_warns_naming_the_file(tmp_path, fake_run, capsys):
    slide = write_slide(tmp_path / "nores.tif", tissue_image(), mpp=None)
    assert slide_predict(fake_run[0][0], slide, "--out", tmp_path / "out") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and str(slide) in warnings[0] and "--mpp" in warnings[0], warnings
    stats = json.loads((tmp_path / "out" / "nores" / "stats.json").read_text())
    assert stats["label_mpp"] is None
    assert slide_predict(fake_run[0][0], slide, "--out", tmp_path / "out2", "--mpp", "0.5") == 0
    assert "WARNING" not in capsys.readouterr().err
