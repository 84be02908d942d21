"""`SegmentationDataset`: a torch `Dataset` over one split of a prepared data set.

Each item follows the batch contract::

    {"image": float32 (3, H, W) in [0, 1], "label": int64 (H, W) (ignore = 255), "id": str,
     "annotated": bool, "inst": int64 (H, W) (only with `with_instances=True`),
     "weight": float32 (H, W) (only with `separation`)}

Augmentation randomness is a pure function of (seed, epoch, index): every item gets its own
`torch.Generator` seeded with `derive_seed(seed, epoch, index)`, so results do not depend on
DataLoader workers or on the order in which items are read. Call `set_epoch` once per epoch.

Example:
    >>> ds = SegmentationDataset(root, "train", transform=TrainTransform(crop_px=64))  # doctest: +SKIP
    >>> ds.set_epoch(1); ds[0]["image"].shape                                          # doctest: +SKIP
    torch.Size([3, 64, 64])
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ldiffusion.core.errors import DatasetFormatError, InputError
from ldiffusion.core.rng import derive_seed, make_generator
from ldiffusion.data.format import IMAGE_SUFFIXES, DatasetInfo, read_dataset_info, read_image, read_mask
from ldiffusion.data.targets import components_per_class, contour_target, separation_weights
from ldiffusion.data.transforms import TrainTransform

logger = logging.getLogger(__name__)

IGNORE = 255
FOLDERS = ("images", "labels", "instances")


def sample_path(root: str | os.PathLike[str], folder: str, case_id: str) -> Path | None:
    """Return the file of `case_id` in `root/folder` (`.png` first, then other containers), or None."""
    base = Path(root) / folder
    for sfx in IMAGE_SUFFIXES:
        p = base / f"{case_id}{sfx}"
        if p.is_file():
            return p
    return None


def annotated_subset(ids: Iterable[str], fraction: float, seed: int) -> set[str]:
    """Choose whole tiles whose labels are kept (semi-supervised experiments).

    Args:
        ids: candidate ids (order does not matter; they are sorted first).
        fraction: share of tiles to keep, in (0, 1]; at least one tile is always kept.
        seed: seed of the choice (same seed and ids -> same subset).

    Returns:
        The chosen ids, `max(1, round(fraction * len(ids)))` of them.

    Raises:
        InputError: `fraction` outside (0, 1] or no ids.
    """
    pool = sorted(set(ids))
    if not 0.0 < fraction <= 1.0:
        raise InputError(f"fraction={fraction!r} is out of range; expected (0, 1]")
    if not pool:
        raise InputError("annotated_subset: got no ids to choose from")
    k = min(len(pool), max(1, round(fraction * len(pool))))
    rng = np.random.default_rng(seed)
    return {pool[i] for i in rng.choice(len(pool), size=k, replace=False).tolist()}


class SegmentationDataset(Dataset):
    """Images, class masks and (optionally) instance maps of one split.

    Args:
        root: prepared data set folder (with `dataset.json`).
        split: "train", "val", "test", a part such as "testA", or "all".
        transform: paired augmentation applied to the uint8 arrays, or None.
        seed: base seed of the per-item augmentation generators.
        annotated_ids: when given, items whose id is not in it get an all-255 label (and an all-0
            instance map) and `annotated=False`.
        with_instances: also return `inst`; the data set must have `instances/<id>.png`.
        cache: keep decoded uint8 arrays in memory after the first read.
        contour_px: when set, labels become the instance-aware 'contour' target
            (`data.targets.contour_target`): the outer `contour_px` pixels of every object get the
            extra class K = `info.num_classes`. Instance maps come from `instances/`; an image
            without one falls back (with a warning) to the connected components of each class.
        contour_split_distance: for that fallback, split each component with the distance-transform
            watershed (markers at least this many px apart) instead; None keeps the components.
        scale: working resolution (the method's `input_scale`): every image, label and instance map
            is resized by it when loaded (`data.resample.resize_maps`), before augmentation and the
            contour target. 1 = the files' resolution.
        separation: (w0, sigma) to add a per-pixel loss weight "weight" (H, W) float32 to each item:
            `data.targets.separation_weights` of the (augmented) objects, high in the gaps between
            neighbouring objects. The objects are the contour target's when `contour_px` is set,
            else the instance map (or the components of each class where an image has none).

    Raises:
        DatasetFormatError: bad `dataset.json`, unknown split, an id of the split without an image
            file, or (on access) another missing file.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str,
        transform: TrainTransform | None = None,
        seed: int = 0,
        annotated_ids: set[str] | None = None,
        with_instances: bool = False,
        cache: bool = True,
        contour_px: int | None = None,
        contour_split_distance: int | None = None,
        scale: float = 1.0,
        separation: tuple[float, float] | None = None,
    ) -> None:
        self.root = Path(root)
        self._info = read_dataset_info(self.root)
        self.split = split
        self._ids = self._info.ids(split)
        missing = [i for i in self._ids if sample_path(self.root, "images", i) is None]
        if missing:
            more = f" ({len(missing) - 1} more ids of the split have no image)" if len(missing) > 1 else ""
            raise DatasetFormatError(
                f"{self.root / 'dataset.json'}: split {split!r} lists id {missing[0]!r} but "
                f"{self.root / 'images' / missing[0]}.png does not exist{more}; run `ldiffusion data check "
                f"{self.root}`"
            )
        self.transform = transform
        self.seed = int(seed)
        self.annotated_ids = None if annotated_ids is None else set(annotated_ids)
        self.with_instances = with_instances
        self.cache = cache
        self.contour_px = contour_px
        self.contour_split_distance = contour_split_distance
        if not 0.0 < scale <= 1.0:
            raise ValueError(f"scale={scale} should be in (0, 1]")
        self.scale = float(scale)
        self.separation = None if separation is None or separation[0] == 0 else tuple(map(float, separation))
        if contour_px is not None:
            missing = [i for i in self._ids if sample_path(self.root, "instances", i) is None]
            if missing:
                how = ("connected components only (touching objects stay merged)"
                       if contour_split_distance is None
                       else f"components split by a watershed (markers >= {contour_split_distance} px apart)")
                logger.warning("%d of %d images of split %r of %s have no instance map (e.g. %s): their "
                               "contour target separates %s", len(missing), len(self._ids), split, self.root,
                               missing[0], how)
        self.epoch = 0
        self._cache: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
        if self.annotated_ids is not None and not self.annotated_ids & set(self._ids):
            logger.warning(
                "none of the %d annotated ids is in split %r of %s",
                len(self.annotated_ids),
                split,
                self.root,
            )

    @property
    def info(self) -> DatasetInfo:
        """The parsed `dataset.json`."""
        return self._info

    @property
    def ids(self) -> list[str]:
        """Ids of the split, in item order."""
        return list(self._ids)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that enters the per-item augmentation seed."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self._ids)

    def _path(self, folder: str, case_id: str) -> Path:
        p = sample_path(self.root, folder, case_id)
        if p is None:
            raise DatasetFormatError(
                f"{self.root / folder / (case_id + '.png')}: file not found for id {case_id!r} of split "
                f"{self.split!r}; run `ldiffusion data check {self.root}`"
            )
        return p

    def load(self, case_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Return the raw arrays of `case_id`: image (H, W, 3) uint8, label (H, W), inst (H, W) or None."""
        if case_id in self._cache:
            return self._cache[case_id]
        img_path, lab_path = self._path("images", case_id), self._path("labels", case_id)
        if self.with_instances:
            inst_path = self._path("instances", case_id)
        elif self.contour_px is not None or self.separation is not None:  # falls back to components
            inst_path = sample_path(self.root, "instances", case_id)
        else:
            inst_path = None
        try:
            image = read_image(img_path)
            label = read_mask(lab_path)
            inst = read_mask(inst_path) if inst_path is not None else None
        except InputError as e:
            raise DatasetFormatError(str(e)) from e
        if label.shape != image.shape[:2]:
            raise DatasetFormatError(
                f"{lab_path}: label size {label.shape} != image size {image.shape[:2]} of {img_path}"
            )
        if inst is not None and inst.shape != label.shape:
            raise DatasetFormatError(
                f"{inst_path}: instance map size {inst.shape} != label size {label.shape}"
            )
        if self._info.ignore_index != IGNORE:
            label = label.astype(np.int32)
            label[label == self._info.ignore_index] = IGNORE
        if self.scale != 1.0:
            from ldiffusion.data.resample import resize_maps

            image, label, inst = resize_maps(image, label, inst, self.scale)
        if self.cache:
            self._cache[case_id] = (image, label, inst)
        return image, label, inst

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Return the item at `index` (see the module docstring for the keys and shapes)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for split {self.split!r} of {len(self)} items")
        index = index % len(self)
        case_id = self._ids[index]
        image, label, inst = self.load(case_id)
        annotated = self.annotated_ids is None or case_id in self.annotated_ids
        if self.transform is not None:
            gen = make_generator(derive_seed(self.seed, self.epoch, index))
            image, label, inst = self.transform(image, label, inst, generator=gen)
        if self.contour_px is not None or self.separation is not None:
            inst = self._objects(label, inst)
        weight = None
        if self.separation is not None:
            weight = separation_weights(inst, *self.separation)
        if self.contour_px is not None:
            label = contour_target(label, inst, self.contour_px, self._info.num_classes, ignore_index=IGNORE)
        out: dict[str, Any] = {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0),
            "label": torch.from_numpy(label.astype(np.int64)),
            "id": case_id,
            "annotated": annotated,
        }
        if not annotated:
            out["label"].fill_(IGNORE)
        if weight is not None:
            out["weight"] = torch.from_numpy(weight)
        if inst is not None and self.with_instances:
            out["inst"] = torch.from_numpy(inst.astype(np.int64))
            if not annotated:
                out["inst"].zero_()
        return out

    def _objects(self, label: np.ndarray, inst: np.ndarray | None) -> np.ndarray:
        """Return the objects of one (augmented) sample: its instance map, or the fallback without one."""
        if inst is not None:
            return inst
        if self.contour_px is not None and self.contour_split_distance is not None:
            from ldiffusion.eval.postprocess import instances_from_semantic

            return instances_from_semantic(label, watershed=True, min_size=0, ignore_index=IGNORE,
                                           min_distance=self.contour_split_distance)
        return components_per_class(label, ignore_index=IGNORE)
