"""Any folder of image/mask pairs -> ldiffusion format ("folder").

Source layout::

    images/<stem>.{png,jpg,bmp,tif,webp}
    masks/<stem>.{png,bmp,tif}          same stem as the image

`mapping` says how mask pixels become class ids:

* a value map `"0=0,255=1"`: single-channel masks (palette PNGs give their indices);
* a colour map `"255,0,0=1;0,255,0=2"`: RGB colours (entries separated by ";");
* empty (default): mask values are the class ids as they are.

A target id of 255 marks pixels as ignore. A value or colour that the map does not list is an
error naming the file and the value, unless `unmapped="ignore"` (then it becomes 255).
`names="bg,tumour,..."` names the classes (id order); without it the classes are called
`background`, `class_1`, ... up to the largest id in the map (or seen in the masks).

Splits: seeded 70 / 15 / 15 by image (options `val`, `test`); task "semantic".
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ldiffusion.core.errors import ConfigError, DatasetFormatError
from ldiffusion.data.converters._common import (
    as_amount,
    check_shape,
    check_src,
    collect_options,
    find_mask,
    finish,
    image_mask_folders,
    map_colours,
    prepare_out,
    progress_bar,
    read_rgb_mask,
    register,
)
from ldiffusion.data.format import ClassInfo, DatasetInfo, read_image, read_mask
from ldiffusion.data.splits import make_splits, split_train_val_test

logger = logging.getLogger(__name__)

NAME = "folder"
VERSION = 1
IGNORE = 255
_DEFAULT_COLOURS = ((0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255),
                    (0, 255, 255), (255, 128, 0), (128, 0, 255), (0, 128, 128))


def parse_mapping(text: str) -> tuple[str, dict]:
    """Parse a mapping option.

    Args:
        text: `"v=id,v=id"` (value map) or `"r,g,b=id;r,g,b=id"` (colour map); "" = identity.

    Returns:
        ("identity", {}), ("value", {int: id}) or ("colour", {(r, g, b): id}).

    Raises:
        ConfigError: malformed entries, values outside 0..255, or a key listed twice.
    """
    text = (text or "").strip()
    if not text:
        return "identity", {}
    kind = "colour" if "," in text.split("=", 1)[0] else "value"  # "r,g,b=id" vs "v=id"
    raw_entries = text.split(";") if kind == "colour" else text.replace(";", ",").split(",")
    entries = [e for e in raw_entries if e.strip()]
    table: dict = {}
    for e in entries:
        if "=" not in e:
            raise ConfigError(f"option mapping: entry {e!r} should look like "
                              f"{'r,g,b=id' if kind == 'colour' else 'value=id'}")
        key, val = (s.strip() for s in e.split("=", 1))
        try:
            target = int(val)
            parts = [int(x) for x in key.split(",")]
        except ValueError as err:
            raise ConfigError(f"option mapping: entry {e!r} has a non-integer value") from err
        if kind == "colour" and len(parts) != 3:
            raise ConfigError(f"option mapping: colour {key!r} should be r,g,b (3 integers)")
        if not 0 <= target <= 255 or any(not 0 <= x <= 65535 for x in parts):
            raise ConfigError(f"option mapping: entry {e!r} is out of range; ids are 0..255 (255 = ignore)")
        k = tuple(parts) if kind == "colour" else parts[0]
        if k in table:
            raise ConfigError(f"option mapping: {key!r} is listed twice")
        table[k] = target
    return kind, table


def _apply_value_map(raw: np.ndarray, table: dict[int, int], path: Path, unmapped: str) -> np.ndarray:
    out = np.full(raw.shape, IGNORE, dtype=np.uint8)
    done = np.zeros(raw.shape, dtype=bool)
    for v, t in table.items():
        sel = raw == v
        out[sel] = t
        done |= sel
    if not done.all():
        bad = sorted(np.unique(raw[~done]).tolist())
        if unmapped != "ignore":
            raise DatasetFormatError(f"{path}: mask value(s) {bad[:8]} are not in the mapping "
                                     f"{sorted(table)}; add them to mapping or pass unmapped=ignore")
    return out


@register(NAME)
def convert(src: Path, out: Path, *, seed: int = 0, progress: bool = True, mapping: str = "",
            names: str = "", unmapped: str = "error", val: float = 0.15, test: float = 0.15,
            mpp: float | None = None, name: str = "folder") -> DatasetInfo:
    """Convert a folder of `images/` + `masks/` pairs with a value or colour map.

    Args:
        src: folder holding `images/` and `masks/`.
        out: output folder.
        seed: seed of the split.
        progress: show a progress bar on stderr.
        mapping: value map `"0=0,255=1"`, colour map `"255,0,0=1;0,255,0=2"`, or "" (values are ids).
        names: comma-separated class names in id order (optional).
        unmapped: "error" (default) or "ignore" (unmapped pixels become 255).
        val: share of images for validation (an int is a number of images).
        test: share of images for testing (an int is a number of images).
        mpp: microns per pixel, if known.
        name: data set name written to dataset.json.

    Returns:
        The written `DatasetInfo` (task "semantic").
    """
    options = collect_options(locals())
    if unmapped not in ("error", "ignore"):
        raise ConfigError(f"option unmapped={unmapped!r} is not valid; choose one of ['error', 'ignore']")
    kind, table = parse_mapping(str(mapping))
    class_names = [s.strip() for s in str(names).split(",") if s.strip()] if names else []
    src = check_src(src, "image/mask")
    images, mask_dir = image_mask_folders(src, "folders images/ and masks/ with files of the same stem")
    writer = prepare_out(out)
    ids: list[str] = []
    max_id = max((t for t in table.values() if t != IGNORE), default=0)
    with progress_bar(images, desc="folder", progress=progress) as bar:
        for p in bar:
            mpath = find_mask(p, mask_dir, hint=" (same stem)")
            image = read_image(p)
            if kind == "colour":
                label = map_colours(read_rgb_mask(mpath), table, mpath,
                                    unknown=IGNORE if unmapped == "ignore" else None).astype(np.uint8)
            else:
                raw = read_mask(mpath)
                if kind == "value":
                    label = _apply_value_map(raw, table, mpath, unmapped)
                else:
                    if raw.max(initial=0) > 255 or raw.min(initial=0) < 0:
                        raise DatasetFormatError(f"{mpath}: mask value {int(raw.max())} does not fit a class "
                                                 "id (0..255); give a mapping")
                    label = raw.astype(np.uint8)
                    max_id = max(max_id, int(label[label != IGNORE].max(initial=0)))
            check_shape(label, mpath, image, p)
            writer.add(p.stem, image, label)
            ids.append(p.stem)
    n_classes = max(max_id + 1, len(class_names), 1)
    if class_names and max_id >= len(class_names):
        raise ConfigError(f"option names gives {len(class_names)} names but class id {max_id} is used; "
                          f"give {max_id + 1} names")
    colours: dict[int, tuple[int, int, int]] = {}
    if kind == "colour":
        for col, t in table.items():
            colours.setdefault(t, tuple(col))
    classes = tuple(
        ClassInfo(i, class_names[i] if class_names else ("background" if i == 0 else f"class_{i}"),
                  colours.get(i, _DEFAULT_COLOURS[i % len(_DEFAULT_COLOURS)]))
        for i in range(n_classes))
    train, val_ids, test_ids = split_train_val_test(ids, val=as_amount(val, "val"),
                                                    test=as_amount(test, "test"), seed=seed)
    info = DatasetInfo(
        name=str(name), task="semantic", classes=classes, mpp=None if mpp is None else float(mpp),
        splits=make_splits(train, val_ids, test_ids),
        source=f"image/mask folder {src.name}; mapping={mapping!r}",
    )
    return finish(writer, info, converter=NAME, version=VERSION, src=src, options=options)
