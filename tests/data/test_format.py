"""`data.format`: image/mask readers across containers, DatasetInfo round trip, errors naming files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from ldiffusion.core.errors import DatasetFormatError, InputError
from ldiffusion.data.format import (
    ClassInfo,
    DatasetInfo,
    read_dataset_info,
    read_image,
    read_mask,
    write_dataset_info,
    write_png,
)

RGB = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".webp"])
def test_read_image_lossless_pil_containers(tmp_path: Path, suffix: str) -> None:
    p = tmp_path / f"x{suffix}"
    kwargs = {"lossless": True} if suffix == ".webp" else {}
    Image.fromarray(RGB).save(p, **kwargs)
    np.testing.assert_array_equal(read_image(p), RGB)


@pytest.mark.parametrize("planar", [False, True])
def test_read_image_tiff(tmp_path: Path, planar: bool) -> None:
    p = tmp_path / "x.tif"
    tifffile.imwrite(p, np.moveaxis(RGB, -1, 0) if planar else RGB, photometric="rgb")
    np.testing.assert_array_equal(read_image(p), RGB)


def test_read_image_jpeg_approximately(tmp_path: Path) -> None:
    smooth = np.zeros((32, 32, 3), np.uint8) + np.array([200, 120, 160], np.uint8)
    p = tmp_path / "x.jpg"
    Image.fromarray(smooth).save(p, quality=95)
    assert np.abs(read_image(p).astype(int) - smooth).max() <= 4


def test_grey_to_rgb_and_rgba_to_rgb(tmp_path: Path) -> None:
    grey = RGB[..., 0]
    Image.fromarray(grey).save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (12, 16, 3) and all(np.array_equal(out[..., c], grey) for c in range(3))
    rgba = np.concatenate([RGB, np.full((12, 16, 1), 7, np.uint8)], axis=-1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), RGB)
    tifffile.imwrite(tmp_path / "g.tif", grey)
    np.testing.assert_array_equal(read_image(tmp_path / "g.tif")[..., 1], grey)


def test_read_mask_palette_rgb_equal_uint16(tmp_path: Path) -> None:
    lab = (np.arange(12 * 16).reshape(12, 16) % 5).astype(np.uint8)
    im = Image.fromarray(lab, "P")
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9] + [0] * (3 * 251))
    im.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "p.png"), lab)
    Image.fromarray(np.repeat(lab[..., None], 3, -1)).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "rgb.png"), lab)
    inst = (np.arange(12 * 16).reshape(12, 16) * 300).astype(np.uint16)
    write_png(tmp_path / "i.png", inst)
    out = read_mask(tmp_path / "i.png")
    assert out.max() == inst.max()
    np.testing.assert_array_equal(out.astype(np.int64), inst.astype(np.int64))
    tifffile.imwrite(tmp_path / "i.tif", inst)
    np.testing.assert_array_equal(read_mask(tmp_path / "i.tif"), inst)


def test_read_mask_rgb_unequal_channels_names_file(tmp_path: Path) -> None:
    Image.fromarray(RGB).save(tmp_path / "c.png")
    with pytest.raises(InputError, match=r"c\.png.*different channels"):
        read_mask(tmp_path / "c.png")


def test_dataset_info_round_trip(tmp_path: Path) -> None:
    info = DatasetInfo(
        name="t",
        task="instance",
        classes=(ClassInfo(0, "bg", (0, 0, 0)), ClassInfo(1, "nuc", (255, 0, 0))),
        splits={"train": ["a", "b"], "val": ["c"], "test": ["d"]},
        mpp=0.25,
        source="src",
        license="CC0",
        parts={"testA": ["d"]},
        groups={"a": "p1"},
    )
    write_dataset_info(tmp_path, info)
    back = read_dataset_info(tmp_path)
    assert back == info and back.ids("testA") == ["d"] and back.ids("all") == ["a", "b", "c", "d"]
    assert back.palette.shape == (2, 3)


def test_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nope\.png"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"xx")
    with pytest.raises(InputError, match=r"bad\.png: cannot read image"):
        read_image(tmp_path / "bad.png")
    with pytest.raises(InputError, match=r"bad\.png: cannot read mask"):
        read_mask(tmp_path / "bad.png")
    with pytest.raises(DatasetFormatError, match=r"dataset\.json: not found"):
        read_dataset_info(tmp_path)
    (tmp_path / "dataset.json").write_text('{"name": "x", "task": "panoptic", "classes": [], "splits": {}}')
    with pytest.raises(DatasetFormatError, match=r"dataset\.json: task='panoptic'"):
        read_dataset_info(tmp_path)
    (tmp_path / "dataset.json").write_text(
        '{"name": "x", "task": "semantic", "classes": [], "splits": {}, "extra": 1}'
    )
    with pytest.raises(DatasetFormatError, match=r"unknown key 'extra'"):
        read_dataset_info(tmp_path)
    (tmp_path / "dataset.json").write_text("{oops")
    with pytest.raises(DatasetFormatError, match=r"dataset\.json: not valid JSON"):
        read_dataset_info(tmp_path)
