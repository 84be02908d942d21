"""Issue 17, data side: nothing lost, nothing let in.

Each test reproduces a case that failed on the code before the fix: the command's exit code, its
one-line message (naming the file, key or value) and the data on disk unchanged (SHA-256 of
every file before and after).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldiffusion.cli import main
from ldiffusion.core.errors import DatasetFormatError
from ldiffusion.data.format import check_id, id_problem, read_dataset_info, read_image

Cap = pytest.CaptureFixture[str]


def tree(root: Path) -> dict[str, str]:
    """SHA-256 of every file under `root` (hidden ones included), by relative path; folders as 'dir'."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def run(args: list[object], capsys: Cap) -> tuple[int, str, str]:
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def error_line(err: str) -> str:
    """The single `error: ...` line of stderr (asserts there is exactly one and no traceback)."""
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def synth12(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic set of 12 images of 64 px (seed 0), made once; copy it before changing it."""
    root = tmp_path_factory.mktemp("safety") / "synth"
    assert main(["data", "synth", str(root), "--n", "12", "--size", "64"]) == 0
    return root


def copy_set(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def folder_source(synth: Path, dst: Path) -> Path:
    """An `images/` + `masks/` source for the `folder` converter, from the synthetic set."""
    shutil.copytree(synth / "images", dst / "images")
    shutil.copytree(synth / "labels", dst / "masks")
    return dst


# ------------------------------------------------------------------ 1. converters never lose a set


@pytest.mark.parametrize("fmt", ["monuseg", "consep-tiles", "wsss4luad", "folder"])
def test_converter_refuses_a_set_written_by_another_command(
    fmt: str, synth12: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = copy_set(synth12, tmp_path / "out")
    src = folder_source(synth12, tmp_path / "src") if fmt == "folder" else tmp_path / "empty"
    src.mkdir(exist_ok=True)
    before = tree(out)
    rc, _, err = run(["data", "prepare", fmt, src, out, "--no-progress"], capsys)
    assert rc == 2
    line = error_line(err)
    assert str(out) in line and "'synth'" in line and f"not by {fmt!r}" in line and "--force" in line
    assert tree(out) == before


@pytest.mark.parametrize("fmt", ["monuseg", "consep-tiles", "wsss4luad", "folder"])
def test_failed_conversion_with_force_keeps_the_old_set(
    fmt: str, synth12: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: exit 2 but OUT left with empty images/ and labels/ (the set was deleted first)."""
    out = copy_set(synth12, tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    before = tree(out)
    rc, _, err = run(["data", "prepare", fmt, empty, out, "--no-progress", "--force"], capsys)
    assert rc == 2
    assert str(empty) in error_line(err)
    assert tree(out) == before


def test_folder_corrupt_source_image_keeps_the_previous_conversion(
    synth12: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: `folder` wiped OUT when a source image was corrupt."""
    src = folder_source(synth12, tmp_path / "src")
    out = tmp_path / "out"
    args = ["data", "prepare", "folder", src, out, "--no-progress"]
    assert run(args, capsys)[0] == 0
    (out / "notes.txt").write_text("my notes")
    before = tree(out)
    bad = src / "images" / "synth_0005.png"
    bad.write_bytes(b"not a png")
    rc, _, err = run(args, capsys)  # same converter: replacing is allowed, but this run fails
    assert rc == 2
    assert str(bad) in error_line(err)
    assert tree(out) == before


def test_successful_conversion_swaps_in_and_keeps_other_entries(
    synth12: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = folder_source(synth12, tmp_path / "src")
    out = tmp_path / "out"
    args = ["data", "prepare", "folder", src, out, "--no-progress"]
    assert run(args, capsys)[0] == 0
    (out / "notes.txt").write_text("my notes")
    for p in sorted((src / "images").iterdir())[6:]:  # a smaller source: the set must shrink
        p.unlink()
    assert run([*args, "--force"], capsys)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "images", "labels", "manifest.json",
                                                     "notes.txt"]
    assert len(list((out / "images").iterdir())) == 6
    assert (out / "notes.txt").read_text() == "my notes"
    assert sum(len(v) for v in read_dataset_info(out).splits.values()) == 6


def test_failed_conversion_into_a_new_folder_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    before = tree(tmp_path)
    rc, _, err = run(["data", "prepare", "monuseg", tmp_path / "empty", tmp_path / "new" / "out",
                      "--no-progress"], capsys)
    assert rc == 2 and "Tissue Images" in error_line(err)
    assert tree(tmp_path) == before


def test_converter_refuses_a_folder_that_is_no_data_set_even_with_force(
    synth12: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = folder_source(synth12, tmp_path / "src")
    before = tree(src)
    rc, _, err = run(["data", "prepare", "folder", src, src, "--no-progress", "--force"], capsys)
    assert rc == 2 and "holds no data set" in error_line(err)
    assert tree(src) == before


# ------------------------------------------------------------------ 2. ids are file names


BAD_IDS = ["../../outside/victim", "/etc/passwd", "", "..", "a\\b", "a\x00b", "x" * 300]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_data_check_refuses_unsafe_ids(
    bad: str, synth12: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: '../../outside/victim' and '/etc/passwd' were looked up as files outside the set."""
    root = copy_set(synth12, tmp_path / "set")
    d = json.loads((root / "dataset.json").read_text())
    d["splits"]["test"].append(bad)
    (root / "dataset.json").write_text(json.dumps(d))
    before = tree(root)
    rc, out, err = run(["data", "check", root], capsys)
    assert rc == 2 and "Traceback" not in err
    lines = out.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"{root / 'dataset.json'}: split 'test': id ") and "is not valid" in lines[0]
    assert repr(bad)[:40].strip("'") in lines[0] or bad[:40] in lines[0]
    with pytest.raises(DatasetFormatError, match=r"dataset\.json: split 'test': id .* is not valid"):
        read_dataset_info(root)
    assert tree(root) == before


def test_check_id_reusable() -> None:
    assert check_id("case_01") == "case_01" and check_id(7) == "7"
    assert id_problem("tile [x=1,y=2]") is None
    for bad in BAD_IDS:
        assert id_problem(bad) is not None
        with pytest.raises(DatasetFormatError, match="where: id"):
            check_id(bad, where="where")


def test_ids_without_files_are_errors(synth12: Path, tmp_path: Path, capsys: Cap) -> None:
    root = copy_set(synth12, tmp_path / "set")
    d = json.loads((root / "dataset.json").read_text())
    d["splits"]["train"].append("ghost")
    (root / "dataset.json").write_text(json.dumps(d))
    rc, out, _ = run(["data", "check", root], capsys)
    assert rc == 2
    assert f"{root / 'images' / 'ghost.png'}: missing image file for id 'ghost'" in out


# ------------------------------------------------------------------ 3. no silent wrong input


def test_16bit_grey_png_is_scaled_not_white(synth12: Path, tmp_path: Path,
                                            capsys: Cap) -> None:
    """Before: read as all 255 (PIL clips I;16 -> RGB), `data check` said OK."""
    root = copy_set(synth12, tmp_path / "set")
    p = root / "images" / "synth_0000.png"
    grey8 = np.asarray(Image.open(p).convert("L"))
    Image.fromarray(grey8.astype(np.uint16) * 257).save(p)
    assert Image.open(p).mode == "I;16"
    img = read_image(p)
    np.testing.assert_array_equal(img[..., 0], grey8)
    np.testing.assert_array_equal(img[..., 2], grey8)
    rc, out, _ = run(["data", "check", root], capsys)
    assert rc == 0  # a warning, not an error
    lo, hi = int(grey8.min()) * 257, int(grey8.max()) * 257
    assert f"{p}: warning: 16-bit image with values {lo}..{hi}: scaled to 8-bit by value // 257" in out
    assert run(["data", "check", root, "--strict"], capsys)[0] == 2


def _modes(rgb: np.ndarray) -> dict[str, tuple[Image.Image, np.ndarray]]:
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    la = Image.merge("LA", [Image.fromarray(grey), Image.fromarray(np.full_like(grey, 255))])
    rgba = Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)]), "RGBA")
    pal = Image.fromarray(rgb).quantize(8)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    bits = Image.fromarray(grey > 127)
    return {
        "LA": (la, np.repeat(grey[..., None], 3, -1)),
        "RGBA": (rgba, rgb),
        "P": (pal, np.asarray(pal.convert("RGB"))),
        "CMYK": (cmyk, np.asarray(cmyk.convert("RGB"))),
        "1": (bits, np.repeat(((grey > 127) * 255).astype(np.uint8)[..., None], 3, -1)),
    }


@pytest.mark.parametrize("mode", ["LA", "RGBA", "P", "CMYK", "1"])
def test_other_pixel_modes_convert_to_rgb(mode: str, tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (16, 20, 3), dtype=np.uint8)
    im, want = _modes(rgb)[mode]
    p = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    im.save(p)
    notes: list[str] = []
    got = read_image(p, notes=notes)
    assert got.shape == (16, 20, 3) and got.dtype == np.uint8
    np.testing.assert_allclose(got.astype(int), want.astype(int), atol=1)
    if mode == "RGBA":
        assert notes == ["alpha channel dropped (320 of 320 pixels not opaque)"]
    if mode == "CMYK":
        assert notes == ["CMYK image converted to RGB"]


def test_float_image_is_refused_with_its_name(tmp_path: Path) -> None:
    p = tmp_path / "f.tif"
    import tifffile

    tifffile.imwrite(p, np.random.default_rng(0).random((8, 8, 3)).astype(np.float32))
    with pytest.raises(Exception, match=r"f\.tif: unsupported image pixel type float32"):
        read_image(p)


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("ignore_index", "x", "ignore_index='x' should be an integer in 0..255"),
    ("ignore_index", 1, "ignore_index=1 is also the id of class 'stroma'"),
    ("mpp", "abc", "mpp='abc' should be a positive number"),
    ("classes", 5, "classes should be a non-empty list"),
    ("splits", [], "splits should map names to lists of ids"),
    ("name", ["x"], "name=['x'] should be a string"),
])
def test_wrong_types_in_dataset_json_exit_2_naming_the_key(
    key: str, value: object, expected: str, synth12: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: `ignore_index: "x"` raised ValueError (traceback); `mpp: "abc"` passed `data check`."""
    root = copy_set(synth12, tmp_path / "set")
    d = json.loads((root / "dataset.json").read_text())
    d[key] = value
    (root / "dataset.json").write_text(json.dumps(d))
    before = tree(root)
    rc, out, err = run(["data", "check", root], capsys)
    assert rc == 2 and "Traceback" not in err
    assert out.strip() == f"{root / 'dataset.json'}: {expected}" or out.strip().startswith(
        f"{root / 'dataset.json'}: {expected}")
    assert tree(root) == before


# ------------------------------------------------------------------ 4. synth does not overwrite


def test_synth_refuses_a_prepared_set(synth12: Path, tmp_path: Path, capsys: Cap) -> None:
    """Before: `data synth` over a prepared set replaced its dataset.json (and mixed the images)."""
    src = folder_source(synth12, tmp_path / "src")
    out = tmp_path / "prepared"
    assert run(["data", "prepare", "folder", src, out, "--no-progress"], capsys)[0] == 0
    before = tree(out)
    rc, _, err = run(["data", "synth", out, "--n", "3", "--size", "32"], capsys)
    assert rc == 2
    line = error_line(err)
    assert str(out) in line and "written by 'folder', not by 'synth'" in line and "--force" in line
    assert tree(out) == before
    assert run(["data", "synth", out, "--n", "3", "--size", "32", "--force"], capsys)[0] == 0
    assert sorted(read_dataset_info(out).ids("all")) == ["synth_0000", "synth_0001", "synth_0002"]
    assert len(list((out / "images").iterdir())) == 3


def test_synth_refuses_a_folder_that_is_no_data_set(tmp_path: Path, capsys: Cap) -> None:
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "thesis.tex").write_text("months of work")
    before = tree(tmp_path)
    for force in ([], ["--force"]):
        rc, _, err = run(["data", "synth", tmp_path / "work", *force], capsys)
        assert rc == 2 and "holds no data set" in error_line(err)
        assert tree(tmp_path) == before


def test_loading_a_split_with_an_id_without_image_fails_naming_it(synth12: Path, tmp_path: Path) -> None:
    """Before: the data set loaded and failed later, mid-training, on the first access of the id."""
    from ldiffusion.data.dataset import SegmentationDataset

    root = copy_set(synth12, tmp_path / "set")
    d = json.loads((root / "dataset.json").read_text())
    d["splits"]["train"].append("ghost")
    (root / "dataset.json").write_text(json.dumps(d))
    want = r"dataset\.json: split 'train' lists id 'ghost' but .*images/ghost\.png does not exist"
    with pytest.raises(DatasetFormatError, match=want):
        SegmentationDataset(root, "train")
    assert len(SegmentationDataset(root, "val")) == 2
