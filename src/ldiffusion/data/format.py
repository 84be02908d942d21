"""The on-disk data set contract: `dataset.json` plus `images/`, `labels/`, `instances/` folders.

Layout of a prepared data set (one folder)::

    dataset.json            {name, task, classes, ignore_index, mpp, splits, source, license,
                             [parts], [groups]}
    images/<id>.png         RGB uint8
    labels/<id>.png         uint8 class ids, 0 = background, `ignore_index` (255) = not annotated
    instances/<id>.png      uint16 instance ids, 0 = none (optional)
    manifest.json           written last by converters (converter name/version, counts)

`parts` (optional) maps a sub-split name to ids, e.g. GlaS {"testA": [...], "testB": [...]};
`groups` (optional) maps each id to its source group (slide, patient or release image) so that
splits can be checked for leakage.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from ldiffusion.core.errors import DatasetFormatError, InputError
from ldiffusion.core.io import atomic_write_bytes, read_json, write_json

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg", ".webp")

Task = Literal["semantic", "instance"]


@dataclasses.dataclass(frozen=True)
class ClassInfo:
    """One class of a data set: integer id, name and display colour (RGB)."""

    id: int
    name: str
    color: tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """The parsed `dataset.json` of a prepared data set."""

    name: str
    task: Task
    classes: tuple[ClassInfo, ...]
    splits: dict[str, list[str]]
    ignore_index: int = 255
    mpp: float | None = None
    source: str = ""
    license: str = ""
    parts: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    groups: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """Number of classes including background."""
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        """Class names in id order."""
        return [c.name for c in self.classes]

    @property
    def palette(self) -> np.ndarray:
        """Colours as a (K, 3) uint8 array indexed by class id."""
        return np.array([c.color for c in self.classes], dtype=np.uint8)

    def ids(self, split: str) -> list[str]:
        """Return the ids of `split` (or of a part such as "testA"); raise when unknown."""
        if split in self.splits:
            return list(self.splits[split])
        if split in self.parts:
            return list(self.parts[split])
        if split == "all":
            return [i for s in SPLITS for i in self.splits.get(s, [])]
        valid = sorted([*self.splits, *self.parts, "all"])
        raise DatasetFormatError(f"split {split!r} not in dataset {self.name!r}; choose one of {valid}")

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form written to `dataset.json`."""
        d: dict[str, Any] = {
            "name": self.name,
            "task": self.task,
            "classes": [{"id": c.id, "name": c.name, "color": list(c.color)} for c in self.classes],
            "ignore_index": self.ignore_index,
            "mpp": self.mpp,
            "splits": {k: list(v) for k, v in self.splits.items()},
            "source": self.source,
            "license": self.license,
        }
        if self.parts:
            d["parts"] = {k: list(v) for k, v in self.parts.items()}
        if self.groups:
            d["groups"] = dict(self.groups)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "dataset.json") -> DatasetInfo:
        """Parse and validate the JSON form; errors name the file and key."""
        required = ["name", "task", "classes", "splits"]
        for k in required:
            if k not in d:
                raise DatasetFormatError(f"{where}: missing key {k!r}")
        known = {"name", "task", "classes", "ignore_index", "mpp", "splits", "source", "license",
                 "parts", "groups"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DatasetFormatError(f"{where}: unknown key {unknown[0]!r}; valid keys are {sorted(known)}")
        if d["task"] not in ("semantic", "instance"):
            raise DatasetFormatError(f"{where}: task={d['task']!r}; expected 'semantic' or 'instance'")
        try:
            classes = tuple(ClassInfo(int(c["id"]), str(c["name"]), tuple(int(x) for x in c["color"]))  # type: ignore[arg-type]
                            for c in d["classes"])
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetFormatError(f"{where}: classes must be a list of {{id, name, color}} ({e})") from e
        if [c.id for c in classes] != list(range(len(classes))):
            raise DatasetFormatError(
                f"{where}: class ids must be 0..K-1 in order, got {[c.id for c in classes]}"
            )
        splits = d["splits"]
        if not isinstance(splits, dict) or any(not isinstance(v, list) for v in splits.values()):
            raise DatasetFormatError(f"{where}: splits must map split names to lists of ids")
        return cls(
            name=str(d["name"]), task=d["task"], classes=classes,
            splits={k: [str(i) for i in v] for k, v in splits.items()},
            ignore_index=int(d.get("ignore_index", 255)), mpp=d.get("mpp"),
            source=str(d.get("source", "")), license=str(d.get("license", "")),
            parts={k: [str(i) for i in v] for k, v in d.get("parts", {}).items()},
            groups={str(k): str(v) for k, v in d.get("groups", {}).items()},
        )


def read_dataset_info(root: str | os.PathLike[str]) -> DatasetInfo:
    """Read `<root>/dataset.json`; raise `DatasetFormatError` naming the file when absent or bad."""
    path = Path(root) / "dataset.json"
    if not path.is_file():
        raise DatasetFormatError(f"{path}: not found; is {root} a prepared data set? "
                                 "(create one with `ldiffusion data prepare` or `data synth`)")
    try:
        d = read_json(path)
    except ValueError as e:
        raise DatasetFormatError(str(e)) from e
    return DatasetInfo.from_dict(d, where=str(path))


def write_dataset_info(root: str | os.PathLike[str], info: DatasetInfo) -> None:
    """Write `<root>/dataset.json` atomically."""
    write_json(Path(root) / "dataset.json", info.to_dict())


# ---------------------------------------------------------------- image I/O


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an RGB image of any common container (PNG, TIFF, BMP, JPEG, WebP).

    Args:
        path: image file.

    Returns:
        (H, W, 3) uint8 array. Grey images are repeated to 3 channels; alpha is dropped.

    Raises:
        InputError: the file is missing or cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: image file not found")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            arr = np.asarray(tifffile.imread(str(path)))
            if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
                arr = np.moveaxis(arr, 0, -1)
        else:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{path}: cannot read image ({e})") from e
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise InputError(f"{path}: expected an RGB image, got array of shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        if arr.dtype == np.uint16:
            arr = (arr // 257).astype(np.uint8)
        else:
            raise InputError(f"{path}: unsupported image dtype {arr.dtype}; expected uint8")
    return np.ascontiguousarray(arr)


def read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a single-channel integer mask (class ids or instance ids) without any conversion.

    Palette PNGs give their indices; RGB masks with equal channels give channel 0.

    Returns:
        (H, W) integer array (uint8, uint16 or int32).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: mask file not found")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            arr = np.asarray(tifffile.imread(str(path)))
        else:
            with Image.open(path) as im:
                arr = (
                    np.asarray(im)
                    if im.mode in ("L", "P", "I", "I;16", "1")
                    else np.asarray(im.convert("RGB"))
                )
    except Exception as e:
        raise InputError(f"{path}: cannot read mask ({e})") from e
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.ndim == 3:
        if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
            raise InputError(f"{path}: RGB mask with different channels; use a colour map to convert it")
        arr = arr[..., 0]
    return np.ascontiguousarray(arr)


def encode_png(arr: np.ndarray) -> bytes:
    """Encode a uint8 (H, W) / (H, W, 3) or uint16 (H, W) array as PNG bytes."""
    if arr.dtype not in (np.uint8, np.uint16) or (arr.dtype == np.uint16 and arr.ndim != 2):
        raise ValueError(f"expected uint8 (H, W[, 3]) or uint16 (H, W) array, got {arr.dtype} {arr.shape}")
    im = Image.fromarray(np.ascontiguousarray(arr))
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def write_png(path: str | os.PathLike[str], arr: np.ndarray) -> None:
    """Write an array as PNG atomically (uint8 RGB/grey, or uint16 grey)."""
    atomic_write_bytes(path, encode_png(arr))


class DatasetWriter:
    """Write samples of a data set into `root` in the standard layout.

    Example:
        >>> w = DatasetWriter(root)                                   # doctest: +SKIP
        >>> w.add("case1", image, label, inst)                        # doctest: +SKIP
        >>> w.finish(info)                                            # doctest: +SKIP
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        for sub in ("images", "labels"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.ids: list[str] = []

    def add(self, case_id: str, image: np.ndarray, label: np.ndarray,
            instances: np.ndarray | None = None) -> None:
        """Write one sample; checks shapes and dtypes.

        Args:
            case_id: file stem, unique in the data set.
            image: (H, W, 3) uint8.
            label: (H, W) class ids (cast to uint8).
            instances: (H, W) instance ids (cast to uint16) or None.
        """
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(f"{case_id}: image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        if label.shape != image.shape[:2]:
            raise ValueError(f"{case_id}: label shape {label.shape} != image shape {image.shape[:2]}")
        if label.max(initial=0) > 255 or label.min(initial=0) < 0:
            raise ValueError(f"{case_id}: label values must fit uint8")
        write_png(self.root / "images" / f"{case_id}.png", image)
        write_png(self.root / "labels" / f"{case_id}.png", label.astype(np.uint8))
        if instances is not None:
            if instances.shape != image.shape[:2]:
                raise ValueError(f"{case_id}: instance shape {instances.shape} != image {image.shape[:2]}")
            if instances.max(initial=0) > 65535:
                raise ValueError(f"{case_id}: more than 65535 instances")
            (self.root / "instances").mkdir(exist_ok=True)
            write_png(self.root / "instances" / f"{case_id}.png", instances.astype(np.uint16))
        self.ids.append(case_id)

    def finish(self, info: DatasetInfo, manifest: dict[str, Any] | None = None) -> None:
        """Write `dataset.json`, then `manifest.json` last."""
        write_dataset_info(self.root, info)
        man = {"n_images": len(self.ids), **(manifest or {})}
        write_json(self.root / "manifest.json", man)


def find_images(folder: str | os.PathLike[str], suffixes: Iterable[str] = IMAGE_SUFFIXES) -> list[Path]:
    """Return image files in `folder` (sorted by name) whose suffix is in `suffixes`."""
    sfx = {s.lower() for s in suffixes}
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in sfx)
