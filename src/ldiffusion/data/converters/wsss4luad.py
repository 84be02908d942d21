"""WSSS4LUAD pixel-annotated sets -> ldiffusion format ("wsss4luad").

Source layout (as released)::

    2.validation/img/NN.{png,webp}    31 images with a mask here
    2.validation/mask/NN.png          palette PNG; the pixel value is the class
    3.testing/img/NN.*                67 images
    3.testing/mask/NN.png

Release classes: 0 tumour epithelium, 1 tumour-associated stroma, 2 normal tissue,
3 background / non-tissue. Our format needs 0 = background, so the ids are **remapped**:
release 3 -> 0 background, 0 -> 1 tumour epithelium, 1 -> 2 tumour-associated stroma,
2 -> 3 normal tissue (colours from the release palette). Masks whose image is missing are skipped.

Ids carry the split folder to stay unique: `val_00` (2.validation), `test_00` (3.testing).
Splits: test = 3.testing (official test set); train/val = 2.validation split seeded by image,
25 / 6 by default. The training set of the challenge has only patch-level labels and is not used.
Scale: not stated by the source (mpp left unset).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ldiffusion.core.errors import DatasetFormatError
from ldiffusion.data.converters._common import (
    apply_lut,
    check_src,
    collect_options,
    finish,
    prepare_out,
    progress_bar,
    read_pair,
    register,
)
from ldiffusion.data.format import ClassInfo, DatasetInfo, DatasetWriter, find_images
from ldiffusion.data.splits import make_splits, split_groups

logger = logging.getLogger(__name__)

NAME = "wsss4luad"
VERSION = 1
CLASSES = (
    ClassInfo(0, "background", (255, 255, 255)),
    ClassInfo(1, "tumour epithelium", (0, 64, 128)),
    ClassInfo(2, "tumour-associated stroma", (64, 128, 0)),
    ClassInfo(3, "normal tissue", (243, 152, 0)),
)
#: release id (index) -> our id.
REMAP = np.array([1, 2, 3, 0], dtype=np.int16)
FOLDERS = {"val": "2.validation", "test": "3.testing"}


def _convert_folder(folder: Path, prefix: str, writer: DatasetWriter, progress: bool) -> list[str]:
    img_dir, mask_dir = folder / "img", folder / "mask"
    if not img_dir.is_dir() or not mask_dir.is_dir():
        raise DatasetFormatError(f"{folder}: expected WSSS4LUAD folders img/ and mask/")
    ids = []
    with progress_bar(find_images(img_dir), desc=f"wsss4luad {folder.name}", progress=progress) as bar:
        for p in bar:
            image, raw, mpath = read_pair(p, mask_dir, (".png",))
            label = apply_lut(raw, REMAP, mpath, "palette indices 0..3 (tumour, stroma, normal, background)")
            case = f"{prefix}_{p.stem}"
            writer.add(case, image, label)
            ids.append(case)
    n_masks = len(find_images(mask_dir, (".png",)))
    if n_masks > len(ids):
        logger.info("%s: %d masks have no image and were skipped", mask_dir, n_masks - len(ids))
    return ids


@register(NAME)
def convert(src: Path, out: Path, *, seed: int = 0, progress: bool = True,
            val_images: int = 6) -> DatasetInfo:
    """Convert the WSSS4LUAD `2.validation` and `3.testing` folders.

    Args:
        src: folder holding `2.validation/` and `3.testing/`.
        out: output folder.
        seed: seed of the train/val split of `2.validation`.
        progress: show a progress bar on stderr.
        val_images: images of `2.validation` kept for validation (the rest is train).

    Returns:
        The written `DatasetInfo` (task "semantic", 4 classes with 0 = background).
    """
    options = collect_options(locals())
    src = check_src(src, "WSSS4LUAD")
    writer = prepare_out(out)
    pool = _convert_folder(src / FOLDERS["val"], "val", writer, progress)
    test = _convert_folder(src / FOLDERS["test"], "test", writer, progress)
    train, val = split_groups(pool, n_val_groups=int(val_images), seed=seed)
    info = DatasetInfo(
        name="wsss4luad", task="semantic", classes=CLASSES, mpp=None,
        splits=make_splits(train, val, test),
        source="WSSS4LUAD (Han et al. 2022), pixel-annotated 2.validation and 3.testing sets; "
               "release ids remapped to 0 background, 1 tumour epithelium, 2 stroma, 3 normal",
        license="unverified; released by the organisers for research",
    )
    return finish(writer, info, converter=NAME, version=VERSION, src=src, options=options)
