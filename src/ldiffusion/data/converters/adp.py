"""ADP (Atlas of Digital Pathology) pixel-level tuning set -> ldiffusion format ("adp").

Source layout (HistoSegNet bundle)::

    img/01_tuning_patch/<slide>.png_crop_<k>.png            50 images, 224x224 RGB
    gt/01_tuning_patch/func/<same name>                     1088x1088 RGBA, colour-coded
    gt/01_tuning_patch/morph/<same name>

Option `taxonomy="func"` (default, functional: Background, Other, G.O, G.N, G.X, T) or `"morph"`
(morphological: Background + 33 ADP hierarchical codes). Colours map to class ids in the order
of the tables below (Background -> 0); alpha is ignored (it is always 255 in the release). An
unknown colour is an error naming the file and the colour. The ground truth is mapped at full
size and then resized to the image size with nearest-neighbour only.

Ids: the file stem with characters other than [A-Za-z0-9_-] replaced by "_"
(`008.png_crop_3788` -> `008_png_crop_3788`, `HE#2.png_crop_517` -> `HE_2_png_crop_517`).

Splits: ADP's tuning set is evaluation-only and has no official split. We draw a seeded
30 / 10 / 10 (train / val / test) split by image so the set can also be used for small
fine-tuning experiments. Patches of the same slide can fall in different splits (the slide
names are irregular and most slides have 1-5 patches), so no `groups` are stored; for pure
evaluation use split "all".
Scale: ~1.21 um/px (0.25 um/px at 1088 px, downsampled to 224 px by the HistoSegNet authors).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
from PIL import Image

from ldiffusion.core.errors import ConfigError, DatasetFormatError
from ldiffusion.data.converters._common import (
    check_src,
    collect_options,
    finish,
    map_colours,
    prepare_out,
    progress_bar,
    read_rgb_mask,
    register,
)
from ldiffusion.data.format import ClassInfo, DatasetInfo, find_images, read_image
from ldiffusion.data.splits import make_splits, split_train_val_test

logger = logging.getLogger(__name__)

NAME = "adp"
VERSION = 1
MPP = round(0.25 * 1088 / 224, 4)

FUNC: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("Background", (255, 255, 255)),
    ("Other", (3, 155, 229)),
    ("G.O", (0, 0, 128)),
    ("G.N", (0, 128, 0)),
    ("G.X", (255, 165, 0)),
    ("T", (173, 20, 87)),
)
MORPH: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("Background", (255, 255, 255)),
    ("E.M.S", (0, 0, 128)), ("E.M.U", (0, 128, 0)), ("E.M.O", (255, 165, 0)),
    ("E.T.S", (255, 192, 203)), ("E.T.U", (255, 0, 0)), ("E.T.O", (173, 20, 87)),
    ("E.T.X", (0, 204, 184)), ("E.P", (176, 141, 105)), ("C.D.I", (3, 155, 229)),
    ("C.D.R", (158, 105, 175)), ("C.L", (216, 27, 96)), ("C.X", (131, 81, 63)),
    ("H.E", (244, 81, 30)), ("H.K", (124, 179, 66)), ("H.Y", (142, 36, 255)),
    ("H.X", (230, 124, 115)), ("S.M.C", (240, 147, 0)), ("S.M.S", (204, 25, 165)),
    ("S.E", (121, 85, 72)), ("S.C.H", (142, 36, 170)), ("S.C.X", (249, 127, 57)),
    ("S.R", (179, 157, 219)), ("A.W", (121, 134, 203)), ("A.B", (97, 97, 97)),
    ("A.M", (167, 155, 142)), ("M.M", (228, 196, 136)), ("M.K", (213, 0, 0)),
    ("N.P", (4, 58, 236)), ("N.R.B", (0, 150, 136)), ("N.R.A", (228, 196, 65)),
    ("N.G.M", (239, 108, 0)), ("N.G.W", (74, 21, 209)), ("N.G.X", (148, 0, 0)),
)
TAXONOMIES = {"func": FUNC, "morph": MORPH}


def class_table(taxonomy: str) -> tuple[ClassInfo, ...]:
    """Return the classes of `taxonomy` ("func" or "morph"); Background is id 0."""
    if taxonomy not in TAXONOMIES:
        raise ConfigError(f"option taxonomy={taxonomy!r} is not valid; choose one of {sorted(TAXONOMIES)}")
    return tuple(ClassInfo(i, name, col) for i, (name, col) in enumerate(TAXONOMIES[taxonomy]))


def case_id(path: Path) -> str:
    """Return the id of an ADP patch file: characters other than [A-Za-z0-9_-] become "_".

    Example: `008.png_crop_3788.png` -> `008_png_crop_3788`, `HE#2.png_crop_517.png` -> `HE_2_png_crop_517`.
    """
    return re.sub(r"[^A-Za-z0-9_-]", "_", path.stem)


@register(NAME)
def convert(src: Path, out: Path, *, seed: int = 0, progress: bool = True,
            taxonomy: str = "func", val: int = 10, test: int = 10) -> DatasetInfo:
    """Convert the ADP tuning set (`img/01_tuning_patch`, `gt/01_tuning_patch/{func,morph}`).

    Args:
        src: folder holding `img/` and `gt/`.
        out: output folder.
        seed: seed of the split.
        progress: show a progress bar on stderr.
        taxonomy: "func" (functional) or "morph" (morphological) ground truth.
        val: number of validation images (default 10).
        test: number of test images (default 10).

    Returns:
        The written `DatasetInfo` (task "semantic").
    """
    options = collect_options(locals())
    classes = class_table(str(taxonomy))
    src = check_src(src, "ADP")
    img_dir = src / "img" / "01_tuning_patch"
    gt_dir = src / "gt" / "01_tuning_patch" / str(taxonomy)
    for d in (img_dir, gt_dir):
        if not d.is_dir():
            raise DatasetFormatError(f"{d}: folder not found; expected ADP layout img/01_tuning_patch/*.png "
                                     "and gt/01_tuning_patch/{func,morph}/<same name>")
    images = find_images(img_dir)
    if not images:
        raise DatasetFormatError(f"{img_dir}: no images found")
    table = {c.color: c.id for c in classes}
    writer = prepare_out(out)
    ids = []
    with progress_bar(images, desc=f"adp {taxonomy}", progress=progress) as bar:
        for p in bar:
            gt_path = gt_dir / p.name
            if not gt_path.is_file():
                raise DatasetFormatError(f"{p}: ground truth {gt_path} not found")
            image = read_image(p)
            full = map_colours(read_rgb_mask(gt_path), table, gt_path).astype(np.uint8)
            h, w = image.shape[:2]
            label = full
            if full.shape != (h, w):
                label = np.asarray(Image.fromarray(full).resize((w, h), Image.Resampling.NEAREST))
            cid = case_id(p)
            if cid in ids:
                raise DatasetFormatError(f"{p}: id {cid!r} is already used by another file; rename one")
            writer.add(cid, image, label)
            ids.append(cid)
    train, val_ids, test_ids = split_train_val_test(ids, val=int(val), test=int(test), seed=seed)
    info = DatasetInfo(
        name=f"adp-{taxonomy}", task="semantic", classes=classes, mpp=MPP,
        splits=make_splits(train, val_ids, test_ids),
        source=f"ADP tuning set (Hosseini et al., CVPR 2019) via HistoSegNet (Chan et al., ICCV 2019); "
               f"{taxonomy} ground truth resized to the image size (nearest-neighbour); "
               "evaluation-only set, split seeded by image",
        license="research only (ADP on request, non-commercial); no open licence",
    )
    return finish(writer, info, converter=NAME, version=VERSION, src=src, options=options)
