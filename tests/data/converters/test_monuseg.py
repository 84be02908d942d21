"""MoNuSeg converter on the real files of ../shared/data/monuseg (converted once per module)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from ldiffusion.data.converters import CONVERTERS
from ldiffusion.data.converters.monuseg import parse_aperio_xml, rasterise_polygons
from ldiffusion.data.format import read_dataset_info, read_mask

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def converted(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("monuseg")
    CONVERTERS.get("monuseg")(shared_data / "monuseg", out, seed=0, progress=False)
    return out


def _xml_stems(src: Path) -> set[str]:
    return {p.name.split(".xml")[0] for p in src.rglob("Annotations/*") if ".xml" in p.name}


def test_counts_and_splits(converted: Path) -> None:
    info = read_dataset_info(converted)
    assert info.task == "instance" and info.mpp == 0.25
    assert info.class_names == ["background", "nucleus"]
    assert len(info.splits["train"]) == 24 and len(info.splits["val"]) == 6
    assert len(info.splits["train"]) + len(info.splits["val"]) == 30
    assert len(info.splits["test"]) == 14
    assert not set(info.splits["val"]) & set(info.splits["train"])
    ids = info.ids("all")
    assert len(ids) == 44
    assert all((converted / "labels" / f"{i}.png").is_file() for i in ids)


def test_instances_exactly_for_xml_images(converted: Path, shared_data: Path) -> None:
    xml = _xml_stems(shared_data / "monuseg")
    assert len(xml) == 27
    inst_ids = {p.stem for p in (converted / "instances").iterdir()}
    assert inst_ids == xml
    info = read_dataset_info(converted)
    assert set(info.splits["test"]) <= inst_ids  # every test image has XML
    for i in sorted(inst_ids)[:3]:
        inst = read_mask(converted / "instances" / f"{i}.png")
        label = read_mask(converted / "labels" / f"{i}.png")
        assert inst.dtype == np.uint16 and inst.max() > 100
        np.testing.assert_array_equal(label, (inst > 0).astype(np.uint8))


def test_label_only_images_match_binary_mask(converted: Path, shared_data: Path) -> None:
    stem = "TCGA-18-5592-01Z-00-DX1"  # no XML in the source; the .tif image
    label = read_mask(converted / "labels" / f"{stem}.png")
    ref = read_mask(shared_data / "monuseg/train/Binary_masks" / f"{stem}.png")
    np.testing.assert_array_equal(label, ref)
    assert not (converted / "instances" / f"{stem}.png").exists()


def test_region_count_matches_xml(converted: Path, shared_data: Path) -> None:
    path = shared_data / "monuseg/test/Annotations/TCGA-2Z-A9J9-01A-01-TS1.xml"  # the raw .xml
    polys = parse_aperio_xml(path)
    n_regions = path.read_text().count("<Region ")
    assert len(polys) == n_regions and all(p.shape[1] == 2 for p in polys)
    inst = read_mask(converted / "instances" / "TCGA-2Z-A9J9-01A-01-TS1.png")
    assert inst.max() <= n_regions
    assert len(np.unique(inst)) - 1 >= 0.9 * n_regions  # only overlapped/degenerate regions vanish


def test_parse_gz_equals_plain(tmp_path: Path, shared_data: Path) -> None:
    src = shared_data / "monuseg/train/Annotations/TCGA-B0-5710-01Z-00-DX1.xml"
    gz = tmp_path / "a.xml.gz"
    gz.write_bytes(gzip.compress(src.read_bytes()))
    a, b = parse_aperio_xml(src), parse_aperio_xml(gz)
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_rasterise_order_and_overlap() -> None:
    # two overlapping squares (x, y): the later region (id 2) wins the overlap
    sq1 = np.array([[1, 1], [5, 1], [5, 5], [1, 5]], dtype=float)
    sq2 = sq1 + 2
    inst = rasterise_polygons([sq1, sq2, np.zeros((0, 2))], (10, 10))
    assert set(np.unique(inst)) == {0, 1, 2}
    assert inst[4, 4] == 2 and inst[2, 2] == 1 and inst[6, 6] == 2


def test_validate(converted: Path) -> None:
    check = pytest.importorskip("ldiffusion.data.check")
    problems = check.validate(converted)
    # No errors (`data check OUT` exits 0); the 17 training images released with binary masks
    # only (no XML) are reported as warnings: they have no instance map by design.
    assert [str(p) for p in problems if p.level == "error"] == []
    warnings = [p for p in problems if p.level == "warning"]
    assert all("no instance map" in p.message for p in warnings), [str(p) for p in warnings]
    assert len(warnings) == 44 - 27
