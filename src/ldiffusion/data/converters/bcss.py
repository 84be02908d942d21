"""BCSS (Breast Cancer Semantic Segmentation) -> ldiffusion format ("bcss").

Source layout::

    images/<name>.png      RGB regions of interest
    masks/<name>.png       ground-truth codes 0..21 (same stem)

BCSS codes: 0 outside_roi, 1 tumor, 2 stroma, 3 lymphocytic_infiltrate, 4 necrosis_or_debris,
5 glandular_secretions, 6 blood, 7 exclude, 8 metaplasia_NOS, 9 fat, 10 plasma_cells,
11 other_immune_infiltrate, 12 mucoid_material, 13 normal_acinus_or_duct, 14 lymphatics,
15 undetermined, 16 nerve, 17 skin_adnexa, 18 blood_vessel, 19 angioinvasion, 20 dcis, 21 other.

BCSS has no background class: every annotated pixel is tissue. `outside_roi` (0) becomes
ignore (255) in both class sets. Our contract reserves id 0 for background, so **class 0 is
declared as "background (unused)" and never occurs in the labels** (it exists only so ids stay
aligned; metrics should skip it, as it is always empty).

* `classes="full"` (default): id k = BCSS code k for k = 1..21 (codes unchanged).
* `classes="main"`: the 5 common classes, 1 tumor (1), 2 stroma (2), 3 inflammatory (3, 10, 11),
  4 necrosis (4), 5 other (all remaining codes); `exclude` (7), which marks regions the annotators
  excluded, also becomes ignore (255).

Splits: seeded 70 / 15 / 15 (train / val / test), grouped by slide: the slide id is the file stem
before the first "_" (e.g. `TCGA-A1-A0SK-DX1`), which the release puts in every name; a stem
without "_" is its own group. `groups` in dataset.json maps each id to its slide.
Scale: mpp 0.25 by default (the BCSS release resolution; option `mpp`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ldiffusion.core.errors import ConfigError
from ldiffusion.data.converters._common import (
    apply_lut,
    as_amount,
    as_float,
    check_src,
    collect_options,
    finish,
    image_mask_folders,
    prepare_out,
    progress_bar,
    read_pair,
    register,
)
from ldiffusion.data.format import ClassInfo, DatasetInfo
from ldiffusion.data.splits import make_splits, split_train_val_test

logger = logging.getLogger(__name__)

NAME = "bcss"
VERSION = 1
IGNORE = 255
CODES = (
    "outside_roi", "tumor", "stroma", "lymphocytic_infiltrate", "necrosis_or_debris",
    "glandular_secretions", "blood", "exclude", "metaplasia_NOS", "fat", "plasma_cells",
    "other_immune_infiltrate", "mucoid_material", "normal_acinus_or_duct", "lymphatics",
    "undetermined", "nerve", "skin_adnexa", "blood_vessel", "angioinvasion", "dcis", "other",
)
_PALETTE = (
    (0, 0, 0), (255, 0, 0), (0, 160, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255),
    (128, 128, 128), (128, 0, 0), (255, 220, 170), (0, 0, 128), (128, 128, 255), (200, 200, 0),
    (0, 128, 128), (128, 0, 128), (192, 192, 192), (255, 128, 0), (128, 255, 128), (160, 0, 80),
    (80, 40, 0), (255, 128, 192), (64, 64, 64),
)
MAIN_NAMES = ("background (unused)", "tumor", "stroma", "inflammatory", "necrosis", "other")
MAIN_COLOURS = ((0, 0, 0), (255, 0, 0), (0, 160, 0), (0, 0, 255), (255, 255, 0), (128, 128, 128))


def class_map(classes: str) -> tuple[tuple[ClassInfo, ...], np.ndarray]:
    """Return (classes, lut) for `classes` = "full" | "main"; lut maps BCSS code -> our id (255 ignore)."""
    if classes == "full":
        infos = (ClassInfo(0, "background (unused)", (0, 0, 0)),
                 *(ClassInfo(k, CODES[k], _PALETTE[k]) for k in range(1, len(CODES))))
        lut = np.arange(len(CODES), dtype=np.int16)
        lut[0] = IGNORE
        return infos, lut
    if classes == "main":
        pairs = zip(MAIN_NAMES, MAIN_COLOURS, strict=True)
        infos = tuple(ClassInfo(i, n, c) for i, (n, c) in enumerate(pairs))
        lut = np.full(len(CODES), 5, dtype=np.int16)  # everything else -> other
        lut[[0, 7]] = IGNORE
        lut[1], lut[2], lut[[3, 10, 11]], lut[4] = 1, 2, 3, 4
        return infos, lut
    raise ConfigError(f"option classes={classes!r} is not valid; choose one of ['full', 'main']")


def slide_id(stem: str) -> str:
    """Return the slide of a BCSS file stem: the part before the first "_" (the stem when none)."""
    return stem.split("_", 1)[0]


@register(NAME)
def convert(src: Path, out: Path, *, seed: int = 0, progress: bool = True, classes: str = "full",
            val: float = 0.15, test: float = 0.15, mpp: float = 0.25) -> DatasetInfo:
    """Convert a BCSS folder of `images/` + `masks/` pairs.

    Args:
        src: folder holding `images/` and `masks/`.
        out: output folder.
        seed: seed of the split.
        progress: show a progress bar on stderr.
        classes: "full" (21 BCSS codes) or "main" (5 classes).
        val: share of images for validation (whole slides; an int is a number of slides).
        test: share of images for testing (whole slides; an int is a number of slides).
        mpp: microns per pixel recorded in dataset.json.

    Returns:
        The written `DatasetInfo` (task "semantic"; class 0 is declared but unused).
    """
    options = collect_options(locals())
    infos, lut = class_map(str(classes))
    src = check_src(src, "BCSS")
    images, mask_dir = image_mask_folders(src, "BCSS folders images/ and masks/ (same file stems)")
    writer = prepare_out(out)
    ids = []
    valid = f"BCSS ground-truth codes 0..{len(CODES) - 1}"
    with progress_bar(images, desc=f"bcss {classes}", progress=progress) as bar:
        for p in bar:
            image, raw, mpath = read_pair(p, mask_dir)
            writer.add(p.stem, image, apply_lut(raw, lut, mpath, valid))
            ids.append(p.stem)
    groups = {i: slide_id(i) for i in ids}
    train, val_ids, test_ids = split_train_val_test(ids, groups, val=as_amount(val, "val"),
                                                    test=as_amount(test, "test"), seed=seed)
    info = DatasetInfo(
        name=f"bcss-{classes}", task="semantic", classes=infos, mpp=as_float(mpp, "mpp"),
        splits=make_splits(train, val_ids, test_ids), groups=groups,
        source=f"BCSS (Amgad et al., Bioinformatics 2019), classes={classes}; outside_roi -> ignore 255; "
               "class 0 background is declared but unused (BCSS has no background)",
        license="CC0 1.0 (BCSS release)",
    )
    return finish(writer, info, converter=NAME, version=VERSION, src=src, options=options)
