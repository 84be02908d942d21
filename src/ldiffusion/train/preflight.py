"""Checks made before a training run touches its folder: the run folder, labels and a data fingerprint.

* `check_run_folder`: a folder holding a run (weights, state, log) is only written into with
  `resume` (continue it) or `overwrite` (start over); anything else is refused before a byte changes.
* `scan_training_data`: reads every label file of the given splits once, refuses a value that is
  neither a class id nor `ignore_index` (it would crash the loss or the validation confusion matrix
  mid-run), and returns a fingerprint of the data set for `--resume` to compare.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ldiffusion.core.errors import CheckpointError, DatasetFormatError, InputError

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
#: files a training run writes; any of them marks a folder as holding a run.
RUN_FILES = ("model.safetensors", "config.json", STATE_FILE, "metrics.jsonl", "config.resolved.json")


def check_run_folder(out: str | os.PathLike[str], *, resume: bool, overwrite: bool) -> list[Path]:
    """Refuse to write a run into a folder that already holds one, unless told how.

    Args:
        out: run folder.
        resume: continue the run stored in `out` (needs its `train_state.pt`).
        overwrite: start a new run in `out`, replacing its files.

    Returns:
        The run files present in `out` (those `overwrite` will replace).

    Raises:
        CheckpointError: `resume` without a state; a state, weights or log present without `resume`
            or `overwrite`; `resume` together with `overwrite`; `out` is a file.
    """
    out = Path(out)
    if resume and overwrite:
        raise CheckpointError("--resume and --overwrite contradict each other: --resume continues the run in "
                              f"{out}, --overwrite starts a new one over it; pass one")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a folder; --out needs a run folder")
    state = out / STATE_FILE
    if resume:
        if not state.is_file():
            raise CheckpointError(f"{state}: not found; nothing to resume (drop --resume to start a new run)")
        return []
    present = [out / f for f in RUN_FILES if (out / f).exists()]
    if present and not overwrite:
        if state.exists():
            raise CheckpointError(f"{out} already holds a training state ({state}); pass --resume to "
                                  "continue it, --overwrite to start over, or choose a new --out folder")
        raise CheckpointError(f"{out} already holds a run ({', '.join(p.name for p in present)}) and no "
                              "training state; refusing to overwrite it: choose a new --out folder or pass "
                              "--overwrite")
    return present


def scan_training_data(root: str | os.PathLike[str], info: Any, splits: Sequence[str]) -> str:
    """Check every label value of `splits` and return a fingerprint of the data set.

    Args:
        root: prepared data set folder.
        info: its `data.format.DatasetInfo` (classes, ignore_index, splits).
        splits: the splits training reads (e.g. ("train", "val")); a missing or empty one is skipped.

    Returns:
        A sha256 hex digest over the class list, `ignore_index`, the ids of each split and, per id,
        the size of its image file and the sha256 of its label file. Moving or copying the data set
        keeps it; other images or labels under the same ids and class names change it.

    Raises:
        DatasetFormatError: a label or image file is missing or unreadable, or a label holds a value
            that is neither a class id (0..K-1) nor `ignore_index` (names the file and the values).
    """
    from ldiffusion.data.dataset import sample_path
    from ldiffusion.data.format import read_mask

    root = Path(root)
    k, ignore = int(info.num_classes), int(info.ignore_index)
    h = hashlib.sha256()
    h.update(json.dumps({"classes": list(info.class_names), "ignore_index": ignore}).encode())
    for split in splits:
        ids = info.splits.get(split) or []
        h.update(json.dumps({"split": split, "ids": list(ids)}).encode())
        for case_id in ids:
            img = sample_path(root, "images", case_id)
            lab = sample_path(root, "labels", case_id)
            if img is None or lab is None:
                folder = "images" if img is None else "labels"
                raise DatasetFormatError(f"{root / folder / (case_id + '.png')}: file not found for id "
                                         f"{case_id!r} of split {split!r}; run `ldiffusion data check "
                                         f"{root}`")
            data = lab.read_bytes()
            h.update(f"{case_id}|{img.stat().st_size}|{hashlib.sha256(data).hexdigest()}".encode())
            try:
                mask = read_mask(lab)
            except InputError as e:
                raise DatasetFormatError(str(e)) from e
            values = np.unique(mask)
            bad = [int(v) for v in values if (v < 0 or v >= k) and v != ignore]
            if bad:
                shown = ", ".join(str(v) for v in bad[:8]) + (", ..." if len(bad) > 8 else "")
                raise DatasetFormatError(
                    f"{lab}: label value(s) {shown} out of range: {k} classes (0..{k - 1}) and "
                    f"ignore_index {ignore} are valid; fix the file or the classes of "
                    f"{root / 'dataset.json'}")
    return h.hexdigest()


def fingerprint_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """Return a one-line description of how `current` run identity differs from `saved`, or None.

    Both dicts hold `num_classes` (int), `config` (JSON text) and `data_fingerprint` (str or None);
    keys missing from either side are not compared.
    """
    if "num_classes" in saved and "num_classes" in current and saved["num_classes"] != current["num_classes"]:
        return (f"the run was started with {saved['num_classes']} classes, the data set now has "
                f"{current['num_classes']}")
    if saved.get("config") is not None and current.get("config") is not None \
            and saved["config"] != current["config"]:
        a, b = json.loads(saved["config"]), json.loads(current["config"])
        keys = sorted(x for x in set(a) | set(b) if a.get(x) != b.get(x))
        diffs = ", ".join(f"{x}={a.get(x)!r} -> {b.get(x)!r}" for x in keys[:5])
        return f"the config differs ({diffs}); resume with the same method, preset and --set values"
    if saved.get("data_fingerprint") and current.get("data_fingerprint") \
            and saved["data_fingerprint"] != current["data_fingerprint"]:
        return ("the data set differs from the one the run was started with (other ids, images or labels "
                "under the same class names); resume with the original --data")
    return None
