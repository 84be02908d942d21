"""CoNSeP as 256x256 tiles with class maps -> ldiffusion format ("consep-tiles").

Source layout::

    Train/Images/train_<n>_folder<i><j>.{webp,png}   27 release images x 16 tiles = 432
    Train/Labels/train_<n>_folder<i><j>.png          8-bit CoNSeP type ids 0..7
    Test/Images/test_<n>_folder<i><j>.*              14 x 16 = 224
    Test/Labels/test_<n>_folder<i><j>.png

Classes: the 8 release ids are merged into the HoVer-Net classes,
0 background, 1 other (1), 2 inflammatory (2), 3 epithelial (3 healthy, 4 dysplastic/malignant),
4 spindle-shaped (5 fibroblast, 6 muscle, 7 endothelial).

Task "semantic": this copy holds no instance maps (only the release's `type_map`).

Splits: grouped by release image (the `train_<n>` / `test_<n>` stem prefix, stored as `groups`),
because the 16 tiles of one image overlap and share tissue. The official Test set is kept; a
seeded validation set of 4 of the 27 train images (all their tiles) is drawn.
Scale: 40x, mpp 0.25.
"""

from __future__ import annotations

import logging
import re
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

NAME = "consep-tiles"
VERSION = 1
MPP = 0.25
CLASSES = (
    ClassInfo(0, "background", (0, 0, 0)),
    ClassInfo(1, "other", (255, 255, 0)),
    ClassInfo(2, "inflammatory", (0, 255, 0)),
    ClassInfo(3, "epithelial", (255, 0, 0)),
    ClassInfo(4, "spindle-shaped", (0, 0, 255)),
)
#: release type id (index) -> merged HoVer-Net class.
MERGE = np.array([0, 1, 2, 3, 3, 4, 4, 4], dtype=np.int16)
_GROUP = re.compile(r"^((?:train|test)_\d+)_")


def source_image(tile_id: str) -> str:
    """Return the release image of a tile id (`train_12_folder03` -> `train_12`)."""
    m = _GROUP.match(tile_id)
    return m.group(1) if m else tile_id


def _convert_split(folder: Path, writer: DatasetWriter, progress: bool) -> list[str]:
    img_dir, lab_dir = folder / "Images", folder / "Labels"
    if not img_dir.is_dir():
        raise DatasetFormatError(f"{img_dir}: folder not found; expected CoNSeP tiles layout "
                                 f"'{folder.name}/Images/*.webp' + '{folder.name}/Labels/*.png'")
    images = find_images(img_dir)
    if not images:
        raise DatasetFormatError(f"{img_dir}: no tile images found")
    ids = []
    with progress_bar(images, desc=f"consep {folder.name}", progress=progress) as bar:
        for p in bar:
            image, raw, lab_path = read_pair(p, lab_dir, (".png", ".bmp", ".tif", ".tiff"), what="label")
            label = apply_lut(raw, MERGE, lab_path, "CoNSeP type ids 0..7")
            writer.add(p.stem, image, label)
            ids.append(p.stem)
    return ids


@register(NAME)
def convert(src: Path, out: Path, *, seed: int = 0, progress: bool = True,
            val_images: int = 4) -> DatasetInfo:
    """Convert the CoNSeP tiles folder (`Train/`, `Test/`).

    Args:
        src: folder holding `Train/` and `Test/`.
        out: output folder.
        seed: seed of the validation split.
        progress: show a progress bar on stderr.
        val_images: number of training *release images* (16 tiles each) moved to validation.

    Returns:
        The written `DatasetInfo` (task "semantic", 5 classes, groups = release image).
    """
    options = collect_options(locals())
    src = check_src(src, "CoNSeP tiles")
    writer = prepare_out(out)
    train_all = _convert_split(src / "Train", writer, progress)
    test = _convert_split(src / "Test", writer, progress)
    groups = {i: source_image(i) for i in train_all + test}
    train, val = split_groups(train_all, groups, n_val_groups=int(val_images), seed=seed)
    info = DatasetInfo(
        name="consep-tiles", task="semantic", classes=CLASSES, mpp=MPP,
        splits=make_splits(train, val, test), groups=groups,
        source="CoNSeP (Graham et al., HoVer-Net, MedIA 2019), 41 release images cut into 16 tiles of "
               "256x256; release type ids merged to the 4 HoVer-Net classes",
        license="cite HoVer-Net (authors' README); Apache-2.0 per kaiko-ai/eva, unverified",
    )
    logger.info("consep-tiles: validation images %s", sorted({groups[i] for i in val}))
    return finish(writer, info, converter=NAME, version=VERSION, src=src, options=options)
