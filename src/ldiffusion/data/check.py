"""Validate a prepared data set on disk and list *every* problem, not just the first.

Checks, in order: `dataset.json` (present, valid JSON, valid schema); empty train/val/test
splits; duplicate ids (within and across splits); `parts` ids missing from the splits; per id
(streamed, one sample in memory at a time): missing or unreadable image / label / instance files,
size mismatches, label values outside the class ids (`ignore_index` allowed); lossy image
conversions (16-bit scaled to 8-bit, transparent alpha dropped, CMYK; see `format.read_image`)
and orphan files (present in a folder but in no split), both reported at level "warning".
Ids that are not one safe file name (`format.check_id`) fail when `dataset.json` is read.

Example:
    >>> problems = validate("data/monuseg")          # doctest: +SKIP
    >>> print(format_problems(problems))             # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np

from ldiffusion.core.errors import LDiffusionError
from ldiffusion.data.dataset import sample_path
from ldiffusion.data.format import (
    IMAGE_SUFFIXES,
    SPLITS,
    DatasetInfo,
    read_dataset_info,
    read_image,
    read_mask,
)

logger = logging.getLogger(__name__)

Level = Literal["error", "warning"]


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem of a data set: the offending file (or `dataset.json`) and what is wrong."""

    path: str
    message: str
    level: Level = "error"

    def __str__(self) -> str:
        prefix = "warning: " if self.level == "warning" else ""
        return f"{self.path}: {prefix}{self.message}"


def format_problems(problems: list[Problem]) -> str:
    """Return one line per problem, `<file>: <message>` (warnings marked "warning: ")."""
    return "\n".join(str(p) for p in problems)


def _check_ids(info: DatasetInfo, where: str) -> list[Problem]:
    problems: list[Problem] = []
    for split in SPLITS:
        if split in info.splits and not info.splits[split]:
            problems.append(Problem(where, f"split {split!r} is empty; remove it or add ids"))
    for split, ids in info.splits.items():
        dup = sorted(i for i, c in Counter(ids).items() if c > 1)
        if dup:
            problems.append(
                Problem(
                    where,
                    f"split {split!r} lists ids more than once: {dup[:10]}{' ...' if len(dup) > 10 else ''}",
                )
            )
    owner: dict[str, str] = {}
    cross: dict[str, list[str]] = {}
    for split, ids in info.splits.items():
        for i in dict.fromkeys(ids):
            if i in owner:
                cross.setdefault(i, [owner[i]]).append(split)
            else:
                owner[i] = split
    for i, splits in sorted(cross.items()):
        problems.append(
            Problem(where, f"id {i!r} is in more than one split: {splits}; each id must be in one split")
        )
    for part, ids in info.parts.items():
        missing = sorted(set(ids) - set(owner))
        if missing:
            problems.append(
                Problem(
                    where,
                    f"part {part!r} has ids that are in no split: {missing[:10]}"
                    f"{' ...' if len(missing) > 10 else ''}",
                )
            )
    return problems


def _check_sample(root: Path, info: DatasetInfo, case_id: str) -> list[Problem]:
    problems: list[Problem] = []
    img_path, lab_path = sample_path(root, "images", case_id), sample_path(root, "labels", case_id)
    for folder, p in (("images", img_path), ("labels", lab_path)):
        if p is None:
            problems.append(
                Problem(
                    str(root / folder / f"{case_id}.png"), f"missing {folder[:-1]} file for id {case_id!r}"
                )
            )
    inst_path = sample_path(root, "instances", case_id)
    if inst_path is None and info.task == "instance":
        problems.append(
            Problem(
                str(root / "instances" / f"{case_id}.png"),
                f"no instance map for id {case_id!r} (task is 'instance'); it will be scored and "
                "trained on its class map only",
                level="warning",
            )
        )

    image_hw: tuple[int, ...] | None = None
    if img_path is not None:
        notes: list[str] = []
        try:
            image_hw = read_image(img_path, notes=notes).shape[:2]
        except LDiffusionError as e:
            problems.append(Problem(str(img_path), f"unreadable image ({e})"))
        problems.extend(Problem(str(img_path), note, level="warning") for note in notes)
    label: np.ndarray | None = None
    if lab_path is not None:
        try:
            label = read_mask(lab_path)
        except LDiffusionError as e:
            problems.append(Problem(str(lab_path), f"unreadable label ({e})"))
    if label is not None:
        if label.ndim != 2:
            problems.append(Problem(str(lab_path), f"label must be (H, W), got shape {label.shape}"))
        elif image_hw is not None and label.shape != image_hw:
            problems.append(
                Problem(str(lab_path), f"label size {label.shape} != image size {image_hw} of {img_path}")
            )
        valid = {c.id for c in info.classes} | {info.ignore_index}
        bad = sorted(int(v) for v in np.unique(label) if int(v) not in valid)
        if bad:
            problems.append(
                Problem(
                    str(lab_path),
                    f"label values {bad} are not class ids 0..{info.num_classes - 1} "
                    f"or ignore_index {info.ignore_index}",
                )
            )
    if inst_path is not None:
        try:
            inst = read_mask(inst_path)
        except LDiffusionError as e:
            problems.append(Problem(str(inst_path), f"unreadable instance map ({e})"))
        else:
            ref = label.shape if label is not None else image_hw
            if inst.ndim != 2:
                problems.append(
                    Problem(str(inst_path), f"instance map must be (H, W), got shape {inst.shape}")
                )
            elif ref is not None and inst.shape != ref:
                problems.append(
                    Problem(str(inst_path), f"instance map size {inst.shape} != label/image size {ref}")
                )
            if not np.issubdtype(inst.dtype, np.integer):
                problems.append(Problem(str(inst_path), f"instance map must hold integers, got {inst.dtype}"))
    return problems


def _orphans(root: Path, known: set[str]) -> list[Problem]:
    problems: list[Problem] = []
    sfx = set(IMAGE_SUFFIXES)
    for folder in ("images", "labels", "instances"):
        d = root / folder
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if p.is_file() and p.suffix.lower() in sfx and p.stem not in known:
                problems.append(
                    Problem(str(p), f"id {p.stem!r} is in no split (orphan file)", level="warning")
                )
    return problems


def validate(root: str | os.PathLike[str]) -> list[Problem]:
    """List every problem of the data set in `root` (empty list = valid).

    Reads one sample at a time, so memory stays at one image whatever the set size.

    Args:
        root: prepared data set folder.

    Returns:
        Problems in the order: dataset.json, ids, per-sample files (split order), orphans.
        Orphan files have `level="warning"`; everything else is an error.
    """
    root = Path(root)
    where = str(root / "dataset.json")
    if not root.is_dir():
        return [Problem(str(root), "not a folder; expected a prepared data set folder with dataset.json")]
    try:
        info = read_dataset_info(root)
    except LDiffusionError as e:
        msg = str(e)
        if msg.startswith(where + ": "):
            msg = msg[len(where) + 2 :]
        return [Problem(where, msg)]
    problems = _check_ids(info, where)
    seen: list[str] = []
    for ids in info.splits.values():
        seen.extend(ids)
    unique = list(dict.fromkeys(seen))
    for case_id in unique:
        problems.extend(_check_sample(root, info, case_id))
    problems.extend(_orphans(root, set(unique)))
    n_warn = sum(p.level == "warning" for p in problems)
    logger.info(
        "checked %d ids of %s: %d errors, %d warnings", len(unique), root, len(problems) - n_warn, n_warn
    )
    return problems
