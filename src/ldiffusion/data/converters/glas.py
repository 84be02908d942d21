"""GlaS 2015 (Warwick-QU gland segmentation) -> ldiffusion format ("glas").

Source layout (flat, as released)::

    Grade.csv                          optional: name, patient ID, grades
    train_<i>.{bmp,webp,png}           85 images + train_<i>_anno.{bmp,png}
    testA_<i>.*                        60 images + testA_<i>_anno.*
    testB_<i>.*                        20 images + testB_<i>_anno.*

Instances: the annotation files hold gland instance ids (RGB with equal channels; channel 0 is
used). Label: 1 gland where the instance id > 0, else 0 background. Task "instance".

Splits: the official test set is kept: test = testA (60) + testB (20), with
`parts = {"testA": [...], "testB": [...]}` in dataset.json. A seeded validation split is drawn
from the 85 training images, grouped by patient (`patient ID` of Grade.csv; each image is its own
group when Grade.csv is absent). `groups` in dataset.json maps the *train and val* ids to their
patient. The official test set shares patients with the training set (as released, e.g. patient 7
is in train, testA and testB), so test ids are deliberately left out of `groups` to keep the
leakage check about the split we make, not about the official one.
Scale: 20x, mpp 0.62 (Zeiss MIRAX MIDI, 0.620 um/px).
"""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

import numpy as np

from ldiffusion.core.errors import DatasetFormatError
from ldiffusion.data.converters._common import (
    as_amount,
    check_shape,
    check_src,
    collect_options,
    find_file,
    finish,
    prepare_out,
    progress_bar,
    register,
)
from ldiffusion.data.format import IMAGE_SUFFIXES, ClassInfo, DatasetInfo, read_image, read_mask
from ldiffusion.data.splits import make_splits, split_groups

logger = logging.getLogger(__name__)

NAME = "glas"
VERSION = 1
MPP = 0.62
CLASSES = (ClassInfo(0, "background", (0, 0, 0)), ClassInfo(1, "gland", (255, 0, 0)))
_STEM = re.compile(r"^(train|testA|testB)_(\d+)$")
#: image containers in order of preference when one stem has several (BMP originals first).
_IMAGE_ORDER = (".bmp", ".png", ".tif", ".tiff", ".webp", ".jpg", ".jpeg")


def read_patients(path: Path) -> dict[str, str]:
    """Read `Grade.csv`: image name -> patient ID (header names are matched after stripping spaces)."""
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise DatasetFormatError(f"{path}: empty file; expected a header with 'name' and 'patient ID'")
    header = [h.strip().lower() for h in rows[0]]
    if "name" not in header or "patient id" not in header:
        raise DatasetFormatError(f"{path}: header {rows[0]} lacks 'name' and 'patient ID' columns")
    i_name, i_pat = header.index("name"), header.index("patient id")
    return {r[i_name].strip(): r[i_pat].strip() for r in rows[1:] if len(r) > max(i_name, i_pat)}


def _scan(src: Path) -> dict[str, list[str]]:
    """Return {"train": [...], "testA": [...], "testB": [...]} image stems, numerically sorted."""
    found: dict[str, set[int]] = {"train": set(), "testA": set(), "testB": set()}
    for p in src.iterdir():
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            m = _STEM.match(p.stem)
            if m:
                found[m.group(1)].add(int(m.group(2)))
    return {k: [f"{k}_{n}" for n in sorted(v)] for k, v in found.items()}


@register(NAME)
def convert(src: Path, out: Path, *, seed: int = 0, progress: bool = True,
            val_fraction: float = 0.2) -> DatasetInfo:
    """Convert a GlaS release folder.

    Args:
        src: the flat GlaS folder.
        out: output folder.
        seed: seed of the validation split.
        progress: show a progress bar on stderr.
        val_fraction: share of the 85 training images wanted in validation (whole patients are
            moved; an int is a number of patients).

    Returns:
        The written `DatasetInfo` (task "instance", classes background/gland, parts testA/testB).
    """
    options = collect_options(locals())
    src = check_src(src, "GlaS")
    stems = _scan(src)
    if not stems["train"] or not (stems["testA"] or stems["testB"]):
        raise DatasetFormatError(f"{src}: expected GlaS files train_<i>.bmp/.webp, testA_<i>.*, testB_<i>.* "
                                 f"with <name>_anno.* masks; found {sum(map(len, stems.values()))} images")
    writer = prepare_out(out)
    all_stems = stems["train"] + stems["testA"] + stems["testB"]
    with progress_bar(all_stems, desc="glas", progress=progress) as bar:
        for stem in bar:
            img_path = find_file(src, stem, _IMAGE_ORDER)
            anno = find_file(src, f"{stem}_anno", (".bmp", ".png", ".tif", ".tiff"))
            if img_path is None or anno is None:
                raise DatasetFormatError(f"{src}: {stem}: expected an image {stem}.bmp/.webp and a mask "
                                         f"{stem}_anno.bmp/.png")
            image = read_image(img_path)
            inst = read_mask(anno).astype(np.int32)
            check_shape(inst, anno, image, img_path)
            writer.add(stem, image, (inst > 0).astype(np.uint8), inst)

    grade = src / "Grade.csv"
    patients = read_patients(grade) if grade.is_file() else {}
    if patients:
        missing = [s for s in stems["train"] if s not in patients]
        if missing:
            raise DatasetFormatError(f"{grade}: no patient ID for {missing[:5]}")
        groups = {s: f"patient_{patients[s]}" for s in stems["train"]}
    else:
        logger.warning("%s: Grade.csv not found; validation split is by image, not by patient", src)
        groups = {s: s for s in stems["train"]}
    amount = as_amount(val_fraction, "val_fraction")
    if isinstance(amount, int):
        train, val = split_groups(stems["train"], groups, n_val_groups=amount, seed=seed)
    else:
        train, val = split_groups(stems["train"], groups, fraction=amount, seed=seed)
    parts = {k: stems[k] for k in ("testA", "testB") if stems[k]}
    info = DatasetInfo(
        name="glas", task="instance", classes=CLASSES, mpp=MPP,
        splits=make_splits(train, val, stems["testA"] + stems["testB"]), parts=parts,
        groups=groups if patients else {},
        source="GlaS 2015 (Sirinukunwattana et al., MedIA 2017; IEEE TMI 2015), Warwick-QU release",
        license="research use only, no commercial use (GlaS challenge data usage terms)",
    )
    logger.info("glas: validation patients %s", sorted({groups[i] for i in val}))
    return finish(writer, info, converter=NAME, version=VERSION, src=src, options=options)
