"""The synthetic data set: determinism, class coverage, rare class, exact masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ldiffusion.core.errors import InputError
from ldiffusion.data.format import read_dataset_info, read_image, read_mask
from ldiffusion.data.synth import GLAND, NECROSIS, NUCLEUS, STROMA, make_synthetic_dataset


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_byte_identical_different_seed_differs(tmp_path: Path) -> None:
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        make_synthetic_dataset(tmp_path / name, n=5, size=32, seed=seed)
    a, b, c = (_files(tmp_path / n) for n in "abc")
    assert a == b
    assert a.keys() == c.keys() and a["images/synth_0000.png"] != c["images/synth_0000.png"]


def test_info_and_splits(synth_root: Path) -> None:
    info = read_dataset_info(synth_root)
    assert info.task == "instance" and info.num_classes == 5 and info.class_names[NECROSIS] == "necrosis"
    counts = {k: len(v) for k, v in info.splits.items()}
    assert counts == {"train": 14, "val": 5, "test": 5}
    ids = [i for v in info.splits.values() for i in v]
    assert len(ids) == len(set(ids)) == 24


def test_classes_present_rare_class_minority_and_colours(synth_root: Path) -> None:
    present = np.zeros(5, int)
    sums, counts = np.zeros((5, 3)), np.zeros(5)
    for lab_path in sorted((synth_root / "labels").glob("*.png")):
        label = read_mask(lab_path)
        image = read_image(synth_root / "images" / lab_path.name).astype(float)
        inst = read_mask(synth_root / "instances" / lab_path.name)
        present[np.unique(label)] += 1
        np.testing.assert_array_equal(inst > 0, label == NUCLEUS)
        for k in range(5):
            sums[k] += image[label == k].sum(0)
            counts[k] += (label == k).sum()
        assert 0.0 < (label == STROMA).mean() < 1.0
    assert (present > 0).all()
    assert 1 <= present[NECROSIS] <= 0.3 * 24  # rare: a minority of the images
    mean = sums / counts[:, None]
    brightness = mean.sum(1)
    assert brightness.argmax() == 0 and brightness.argmin() == NUCLEUS  # white background, dark nuclei
    assert mean[STROMA, 0] > mean[STROMA, 1] + 40  # pink
    assert mean[GLAND, 2] > mean[STROMA, 2]  # epithelium bluer than stroma
    dists = np.linalg.norm(mean[:, None] - mean[None], axis=-1)
    assert dists[~np.eye(5, dtype=bool)].min() > 20  # strong colour cues between every pair


def test_instance_ids_contiguous(synth_root: Path) -> None:
    inst = read_mask(next((synth_root / "instances").glob("*.png")))
    ids = np.unique(inst[inst > 0])
    assert inst.dtype == np.uint16 and list(ids) == list(range(1, len(ids) + 1))


def test_bad_arguments() -> None:
    with pytest.raises(InputError, match="size=8"):
        make_synthetic_dataset("/nonexistent", n=2, size=8)
    with pytest.raises(InputError, match="splits"):
        make_synthetic_dataset("/nonexistent", n=2, size=32, splits=(1.0, -1.0, 0.0))
