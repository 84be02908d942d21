"""`SegmentationDataset`: batch contract, determinism per (seed, epoch, index), annotation masks."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ldiffusion.core.errors import DatasetFormatError, InputError
from ldiffusion.data.dataset import SegmentationDataset, annotated_subset
from ldiffusion.data.format import read_image, read_mask
from ldiffusion.data.transforms import TrainTransform


def test_item_contract_matches_files(synth_root: Path) -> None:
    ds = SegmentationDataset(synth_root, "train", with_instances=True)
    assert len(ds) == len(ds.info.splits["train"]) and ds.ids == ds.info.splits["train"]
    item = ds[0]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 64, 64)
    assert item["image"].min() >= 0.0 and item["image"].max() <= 1.0
    assert item["label"].dtype == torch.int64 and item["label"].shape == (64, 64)
    assert item["inst"].dtype == torch.int64 and item["id"] == ds.ids[0] and item["annotated"] is True
    img = read_image(synth_root / "images" / f"{ds.ids[0]}.png")
    np.testing.assert_array_equal((item["image"] * 255).round().byte().permute(1, 2, 0).numpy(), img)
    np.testing.assert_array_equal(
        item["label"].numpy(), read_mask(synth_root / "labels" / f"{ds.ids[0]}.png")
    )
    assert "inst" not in SegmentationDataset(synth_root, "val")[0]


def test_augmentation_deterministic_per_seed_epoch_index(synth_root: Path) -> None:
    t = TrainTransform(crop_px=32, color_jitter=0.2)
    a = SegmentationDataset(synth_root, "train", transform=t, seed=1)
    b = SegmentationDataset(synth_root, "train", transform=t, seed=1, cache=False)
    # order of access does not matter
    xs = [a[i]["image"] for i in range(3)]
    ys = [b[i]["image"] for i in reversed(range(3))][::-1]
    for x, y in zip(xs, ys, strict=True):
        assert torch.equal(x, y)
    assert xs[0].shape == (3, 32, 32)
    a.set_epoch(1)
    assert not torch.equal(a[0]["image"], xs[0])
    c = SegmentationDataset(synth_root, "train", transform=t, seed=2)
    assert not all(torch.equal(c[i]["image"], xs[i]) for i in range(3))


def test_annotated_ids_withhold_labels(synth_root: Path) -> None:
    ids = SegmentationDataset(synth_root, "train").ids
    keep = {ids[0]}
    ds = SegmentationDataset(synth_root, "train", annotated_ids=keep, with_instances=True)
    assert ds[0]["annotated"] is True and (ds[0]["label"] != 255).any()
    other = ds[1]
    assert (
        other["annotated"] is False and bool((other["label"] == 255).all()) and int(other["inst"].max()) == 0
    )


def test_annotated_subset() -> None:
    ids = [f"t{i}" for i in range(10)]
    s = annotated_subset(ids, 0.3, seed=0)
    assert len(s) == 3 and s <= set(ids)
    assert s == annotated_subset(reversed(ids), 0.3, seed=0)
    assert len(annotated_subset(ids, 0.01, seed=0)) == 1
    assert annotated_subset(ids, 1.0, seed=5) == set(ids)
    with pytest.raises(InputError, match="fraction"):
        annotated_subset(ids, 0.0, seed=0)


def test_missing_file_error_names_file(synth_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    shutil.copytree(synth_root, root)
    ds = SegmentationDataset(root, "test", cache=False)
    missing = root / "labels" / f"{ds.ids[0]}.png"
    missing.unlink()
    with pytest.raises(DatasetFormatError, match=str(missing)):
        ds[0]


def test_unknown_split_and_index(synth_root: Path) -> None:
    with pytest.raises(DatasetFormatError, match="split 'trian'"):
        SegmentationDataset(synth_root, "trian")
    ds = SegmentationDataset(synth_root, "val")
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_dataloader_batches(synth_root: Path) -> None:
    ds = SegmentationDataset(synth_root, "train", transform=TrainTransform(crop_px=32))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["label"].shape == (4, 32, 32)
    assert len(batch["id"]) == 4 and batch["annotated"].dtype == torch.bool


def test_contour_fallback_splits_touching_objects_of_images_without_instances(synth_root: Path,
                                                                              tmp_path: Path) -> None:
    from ldiffusion.data.format import write_png

    root = tmp_path / "ds"
    shutil.copytree(synth_root, root)
    case = SegmentationDataset(root, "train").ids[0]
    yy, xx = np.mgrid[:64, :64]
    # two touching discs
    two = ((yy - 32) ** 2 + (xx - 20) ** 2 <= 100) | ((yy - 32) ** 2 + (xx - 38) ** 2 <= 100)
    write_png(root / "labels" / f"{case}.png", two.astype(np.uint8))
    for p in (root / "instances").glob(f"{case}.*"):
        p.unlink()
    k = SegmentationDataset(root, "train").info.num_classes
    merged = SegmentationDataset(root, "train", contour_px=2)[0]["label"].numpy()
    split = SegmentationDataset(root, "train", contour_px=2, contour_split_distance=5)[0]["label"].numpy()
    neck = (slice(31, 34), slice(28, 31))  # where the two discs meet, over 2 px from the outline
    assert (merged[neck][two[neck]] == 1).all()  # components: no boundary between the discs
    assert (split[neck] == k).any()  # watershed: a boundary band where they touch
    assert np.array_equal(split > 0, two) and np.array_equal(merged > 0, two)


def test_separation_adds_a_weight_map_from_the_augmented_objects(synth_root: Path) -> None:
    from ldiffusion.data.targets import contour_target, separation_weights

    tf = TrainTransform(crop_px=48)
    plain = SegmentationDataset(synth_root, "train", transform=tf, with_instances=True)[1]
    item = SegmentationDataset(synth_root, "train", transform=tf, with_instances=True, contour_px=2,
                               separation=(10.0, 4.0))[1]
    assert "weight" not in plain and item["weight"].dtype == torch.float32
    assert item["weight"].shape == item["label"].shape == (48, 48)
    inst = item["inst"].numpy()
    assert np.array_equal(inst, plain["inst"].numpy())  # the same crop: weights follow the augmentation
    assert np.allclose(item["weight"].numpy(), separation_weights(inst, 10.0, 4.0))
    k = SegmentationDataset(synth_root, "train").info.num_classes
    assert np.array_equal(item["label"].numpy(), contour_target(plain["label"].numpy(), inst, 2, k))
    assert "weight" not in SegmentationDataset(synth_root, "train", separation=(0.0, 4.0))[0]
