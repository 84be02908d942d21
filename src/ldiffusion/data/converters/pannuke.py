"""PanNuke -> ldiffusion format ("pannuke").

Source layouts (both accepted, per fold N)::

    Fold N/images/foldN/images.npy   (B, 256, 256, 3) float64 0..255   (release layout)
    Fold N/images/foldN/types.npy    (B,) tissue type strings
    Fold N/masks/foldN/masks.npy     (B, 256, 256, 6) instance ids per class channel
    foldN/{images,masks,types}.npy                                      (flat layout)

Mask channels 0..4 hold the instance ids of neoplastic, inflammatory, connective/soft tissue,
dead and epithelial nuclei; channel 5 is background and is not used.

Labels: 0 background, 1 neoplastic, 2 inflammatory, 3 connective, 4 dead, 5 epithelial
(channel c -> class c + 1; where channels overlap, the later channel wins). Instances: the union
of all channels, each (channel, id) pair renumbered to a unique id 1..N (channel-major, then by
id). Task "instance".

Splits: whole folds (the official 3-fold protocol): fold 1 train, fold 2 val, fold 3 test by
default; options `train`, `val`, `test` take fold numbers ("1" or "1,2"). Ids are
`fold<N>_<index>`. Arrays are opened with `np.load(mmap_mode="r")`, so memory stays at one image.
Scale: 40x, mpp 0.25.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ldiffusion.core.errors import ConfigError, DatasetFormatError
from ldiffusion.data.converters._common import (
    check_src,
    collect_options,
    finish,
    parse_int_list,
    prepare_out,
    progress_bar,
    register,
)
from ldiffusion.data.format import ClassInfo, DatasetInfo
from ldiffusion.data.splits import make_splits

logger = logging.getLogger(__name__)

NAME = "pannuke"
VERSION = 1
MPP = 0.25
CLASSES = (
    ClassInfo(0, "background", (0, 0, 0)),
    ClassInfo(1, "neoplastic", (255, 0, 0)),
    ClassInfo(2, "inflammatory", (0, 255, 0)),
    ClassInfo(3, "connective", (0, 0, 255)),
    ClassInfo(4, "dead", (255, 255, 0)),
    ClassInfo(5, "epithelial", (255, 165, 0)),
)
N_CLASSES = 5


def fold_files(src: Path, n: int) -> dict[str, Path] | None:
    """Return {"images", "masks", "types"?} paths of fold `n`, or None when the fold is absent."""
    layouts = [
        {"images": src / f"Fold {n}" / "images" / f"fold{n}" / "images.npy",
         "masks": src / f"Fold {n}" / "masks" / f"fold{n}" / "masks.npy",
         "types": src / f"Fold {n}" / "images" / f"fold{n}" / "types.npy"},
        {"images": src / f"fold{n}" / "images.npy",
         "masks": src / f"fold{n}" / "masks.npy",
         "types": src / f"fold{n}" / "types.npy"},
    ]
    for lay in layouts:
        if lay["images"].is_file() and lay["masks"].is_file():
            return lay
    return None


def masks_to_label(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Turn one PanNuke mask (H, W, 6) into (label uint8 (H, W), instances int32 (H, W)).

    Args:
        masks: channels 0..4 instance ids per class, channel 5 background (ignored).

    Returns:
        label: class c + 1 where channel c > 0 (later channels win on overlap), else 0.
        instances: every (channel, id) pair renumbered 1..N, channel-major then by id.
    """
    if masks.ndim != 3 or masks.shape[-1] < N_CLASSES:
        raise ValueError(f"expected a (H, W, 6) PanNuke mask, got {masks.shape}")
    h, w = masks.shape[:2]
    label = np.zeros((h, w), dtype=np.uint8)
    inst = np.zeros((h, w), dtype=np.int32)
    offset = 0
    for c in range(N_CLASSES):
        ch = np.rint(np.asarray(masks[..., c], dtype=np.float64)).astype(np.int64)
        fg = ch > 0
        if not fg.any():
            continue
        uniq, inv = np.unique(ch[fg], return_inverse=True)
        label[fg] = c + 1
        inst[fg] = offset + 1 + inv
        offset += len(uniq)
    return label, inst


def _to_uint8(image: np.ndarray, where: str) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.min() < 0 or arr.max() > 255:
        raise DatasetFormatError(f"{where}: image values outside 0..255 ({arr.min()}..{arr.max()})")
    return np.rint(arr).astype(np.uint8)


@register(NAME)
def convert(src: Path, out: Path, *, seed: int = 0, progress: bool = True,
            train: Any = "1", val: Any = "2", test: Any = "3") -> DatasetInfo:
    """Convert PanNuke folds.

    Args:
        src: folder holding `Fold 1/`, `Fold 2/`, ... (or flat `fold1/`, ...).
        out: output folder.
        seed: unused (splits are whole folds); kept for a uniform interface.
        progress: show a progress bar on stderr.
        train: fold number(s) for training, e.g. "1" or "1,2".
        val: fold number(s) for validation ("" for none).
        test: fold number(s) for testing ("" for none).

    Returns:
        The written `DatasetInfo` (task "instance", 5 nucleus classes + background).
    """
    options = collect_options(locals())
    src = check_src(src, "PanNuke")
    plan = {"train": parse_int_list(train, "train"), "val": parse_int_list(val, "val"),
            "test": parse_int_list(test, "test")}
    used = [n for folds in plan.values() for n in folds]
    if len(set(used)) != len(used):
        raise ConfigError(f"options train={train!r}, val={val!r}, test={test!r}: a fold is in two splits")
    if not plan["train"]:
        raise ConfigError("option train is empty; give at least one fold number")
    files = {}
    for n in used:
        f = fold_files(src, n)
        if f is None:
            raise DatasetFormatError(f"{src}: fold {n} not found; expected "
                                     f"'Fold {n}/images/fold{n}/images.npy' + "
                                     f"'Fold {n}/masks/fold{n}/masks.npy' "
                                     f"or 'fold{n}/images.npy' + 'fold{n}/masks.npy'")
        files[n] = f
    writer = prepare_out(out)
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    tissue_counts: dict[str, int] = {}
    for split, folds in plan.items():
        for n in folds:
            f = files[n]
            images = np.load(f["images"], mmap_mode="r")
            masks = np.load(f["masks"], mmap_mode="r")
            if images.ndim != 4 or images.shape[-1] != 3 or masks.ndim != 4 or masks.shape[-1] < N_CLASSES \
                    or images.shape[:3] != masks.shape[:3]:
                raise DatasetFormatError(f"{f['images']}: shapes {images.shape} / {masks.shape} "
                                         "(masks.npy) do not match; expected (B, H, W, 3) and (B, H, W, 6)")
            types = None
            if f["types"].is_file():
                try:
                    types = np.load(f["types"], allow_pickle=False)
                except ValueError:  # an object array; tissue types are informative only
                    logger.warning("%s: not a plain string array; tissue types not recorded", f["types"])
                    types = None
                if types is not None and len(types) != len(images):
                    raise DatasetFormatError(f"{f['types']}: {len(types)} entries for {len(images)} images")
            width = max(4, len(str(len(images) - 1)))
            with progress_bar(range(len(images)), desc=f"pannuke fold{n}", progress=progress) as bar:
                for k in bar:
                    cid = f"fold{n}_{k:0{width}d}"
                    label, inst = masks_to_label(masks[k])
                    writer.add(cid, _to_uint8(images[k], f"{f['images']}[{k}]"), label, inst)
                    splits[split].append(cid)
                    if types is not None:
                        t = str(types[k])
                        tissue_counts[t] = tissue_counts.get(t, 0) + 1
            del images, masks
    info = DatasetInfo(
        name="pannuke", task="instance", classes=CLASSES, mpp=MPP,
        splits=make_splits(splits["train"], splits["val"], splits["test"]),
        source=f"PanNuke (Gamper et al. 2019/2020), folds train={plan['train']} val={plan['val']} "
               f"test={plan['test']}",
        license="CC BY-NC-SA 4.0",
    )
    return finish(writer, info, converter=NAME, version=VERSION, src=src, options=options,
                  extra={"tissue_types": dict(sorted(tissue_counts.items()))})
