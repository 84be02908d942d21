"""Score a folder of predicted class maps against a prepared data set, streaming over images.

Predictions are `<pred_dir>/<id>.png` class maps (same size as `labels/<id>.png`) and, optionally,
`<pred_dir>/<id>_inst.png` instance maps; without one, instances are extracted from the class map
(`postprocess.instances_from_semantic`, connected components, optional watershed).
Only accumulators are kept between images, so memory does not grow with the number of images.
Truth pixels equal to `ignore_index` are dropped from the semantic counts and are set to
background in both instance maps before instance / gland metrics.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ldiffusion.core.errors import InputError
from ldiffusion.data.format import DatasetInfo, read_dataset_info, read_mask
from ldiffusion.eval.glas import GlandAccumulator
from ldiffusion.eval.instance import PQAccumulator
from ldiffusion.eval.postprocess import instances_from_semantic
from ldiffusion.eval.semantic import ConfusionMatrix, PerImageMean, semantic_scores

logger = logging.getLogger(__name__)

__all__ = ["evaluate_folder", "format_table"]


def _check_predictions(pred_dir: Path, ids: list[str]) -> None:
    if not pred_dir.is_dir():
        raise InputError(f"{pred_dir}: prediction folder not found")
    missing = [i for i in ids if not (pred_dir / f"{i}.png").is_file()]
    if missing:
        shown = ", ".join(str(pred_dir / f"{i}.png") for i in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise InputError(f"missing prediction {shown}{more} ({len(missing)} of {len(ids)} images); "
                         "expected one <id>.png class map per image of the split")


def _read_pred(path: Path, shape: tuple[int, ...], truth_path: Path) -> np.ndarray:
    pred = read_mask(path)
    if pred.shape != shape:
        raise InputError(f"{path}: size {pred.shape[1]}x{pred.shape[0]} (WxH) differs from the label "
                         f"{truth_path} size {shape[1]}x{shape[0]}; predictions must have the label's size")
    return pred


def _clean(x: Any) -> Any:
    """Turn NaN into None and numpy scalars into Python ones, recursively (strict JSON)."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


#: appended to the convention of a `binary=True` evaluation
BINARY_NOTE = "; foreground classes merged into one (binary)"


def evaluate_folder(pred_dir: str | os.PathLike[str], data_root: str | os.PathLike[str],
                    split: str = "test", foreground_only: bool = False, instances: bool = False,
                    watershed: bool = False, gland: bool | None = None, min_size: int = 10,
                    progress: bool = True, min_distance: int = 3, binary: bool = False) -> dict[str, Any]:
    """Score predictions against the labels of one split of a prepared data set.

    Args:
        pred_dir: folder with `<id>.png` class maps (and optional `<id>_inst.png`).
        data_root: prepared data set folder (holding `dataset.json`).
        split: split or part name ("test", "val", "testA", ...).
        foreground_only: score foreground classes only (class 0 excluded from the means).
        instances: also compute AJI / PQ (/ mPQ with > 1 foreground class); needs `instances/`.
        watershed: split touching objects when extracting instances from class maps.
        gland: GlaS object metrics; None = automatically when the data set name starts with "glas".
        min_size: objects smaller than this (px) are dropped when extracting instances from class
            maps (not applied to `<id>_inst.png` files).
        progress: show a progress bar on stderr.
        min_distance: minimal distance (px) between watershed markers (with `watershed`).
        binary: merge every foreground class into one, in the truth and in the predictions, and
            score background / foreground only: a one-class model (nuclei trained on MoNuSeg) on a
            typed data set (CoNSeP's nucleus types), or a typed model as a detector.

    Returns:
        {"dataset", "split", "n_images", "convention", "semantic": {dice, miou, mpa, fwiou, ...,
        "per_class": [...]}, "per_image_mean": {...}, and where computed "instance": {...},
        "gland": {...}}. Fractions are in [0, 1]; Hausdorff distances in px; undefined values None.

    Raises:
        InputError: a prediction is missing or its size differs from the label (the message names
            the file), or `instances=True` on a data set without `instances/`.
        DatasetFormatError: `data_root` is not a prepared data set or `split` is unknown.
    """
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    root = Path(data_root)
    pred_dir = Path(pred_dir)
    info: DatasetInfo = read_dataset_info(root)
    ids = info.ids(split)
    if not ids:
        raise InputError(f"split {split!r} of {root} has no images")
    _check_predictions(pred_dir, ids)
    inst_dir = root / "instances"
    if instances and not inst_dir.is_dir():
        raise InputError(f"{inst_dir}: not found; --instances needs a data set with instance maps "
                         f"({info.name!r} has task {info.task!r})")
    if gland is None:
        gland = info.name.lower().startswith("glas")
    if gland and not inst_dir.is_dir():
        raise InputError(f"{inst_dir}: not found; gland metrics need truth instance maps")
    k, ign = info.num_classes, info.ignore_index
    class_names = info.class_names
    if binary:
        k, class_names = 2, [class_names[0], "foreground"]
    cm = ConfusionMatrix(k, ign)
    per_image = PerImageMean(k, foreground_only)
    pq_acc = PQAccumulator(k, class_names=class_names) if instances else None
    gland_acc = GlandAccumulator() if gland else None
    skipped_inst: list[str] = []
    with logging_redirect_tqdm():
        for case in tqdm(ids, desc=f"evaluate {info.name}/{split}", disable=not progress, unit="img",
                         leave=False):
            truth_path = root / "labels" / f"{case}.png"
            truth = read_mask(truth_path)
            pred = _read_pred(pred_dir / f"{case}.png", truth.shape, truth_path)
            if binary:
                truth = np.where(truth == ign, ign, truth != 0).astype(truth.dtype)
                pred = (pred != 0).astype(pred.dtype)
            per_image.update(cm.update(truth, pred))
            if pq_acc is None and gland_acc is None:
                continue
            t_path = inst_dir / f"{case}.png"
            if not t_path.is_file():
                skipped_inst.append(case)
                continue
            true_inst = read_mask(t_path)
            if true_inst.shape != truth.shape:
                raise InputError(f"{t_path}: size {true_inst.shape} differs from {truth_path} {truth.shape}")
            p_path = pred_dir / f"{case}_inst.png"
            if p_path.is_file():
                pred_inst = _read_pred(p_path, truth.shape, truth_path)
            else:
                pred_inst = instances_from_semantic(pred, watershed=watershed, min_size=min_size,
                                                    ignore_index=ign, min_distance=min_distance)
            ignored = truth == ign
            if ignored.any():
                true_inst = np.where(ignored, 0, true_inst)
                pred_inst = np.where(ignored, 0, pred_inst)
            if pq_acc is not None:
                pq_acc.update(true_inst, pred_inst, truth, pred)
            if gland_acc is not None:
                gland_acc.update(true_inst, pred_inst)
    if skipped_inst:
        logger.warning("%d of %d images have no truth instance map (instances/<id>.png) and are left out "
                       "of the instance metrics, e.g. %s", len(skipped_inst), len(ids), skipped_inst[0])
    sem = semantic_scores(cm.matrix, foreground_only=foreground_only, class_names=class_names,
                          ignore_index=ign)
    result: dict[str, Any] = {
        "dataset": info.name, "split": split, "n_images": len(ids),
        "convention": sem.pop("convention") + (BINARY_NOTE if binary else ""),
        "semantic": sem,
        "per_image_mean": per_image.result(class_names),
        "confusion_matrix": cm.matrix.tolist(),
    }
    if pq_acc is not None:
        result["instance"] = {
            **pq_acc.result(),
            "n_images_without_truth_instances": len(skipped_inst),
            "source": "<id>_inst.png where present, else connected components of the "
            f"class map{f' + watershed (markers >= {min_distance} px apart)' if watershed else ''} "
            f"(objects < {min_size} px dropped)",
        }
    if gland_acc is not None:
        result["gland"] = gland_acc.result()
    return _clean(result)


def _fmt(v: Any, pct: bool = True) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{100 * v:.2f}" if pct else f"{v:.2f}"
    return str(v)


def format_table(result: dict[str, Any]) -> str:
    """Render an `evaluate_folder` result as a plain-text table (fractions shown as %)."""
    sem = result["semantic"]
    lines = [f"{result['dataset']} / {result['split']}: {result['n_images']} images "
             f"({'foreground classes only' if sem.get('foreground_only') else 'all classes'})",
             f"convention: {result['convention']}", ""]
    lines.append(f"{'class':<20}{'Dice %':>9}{'IoU %':>9}{'PA %':>9}{'support':>14}{'scored':>8}")
    for p in sem["per_class"]:
        lines.append(f"{p['name'][:19]:<20}{_fmt(p['dice']):>9}{_fmt(p['iou']):>9}"
                     f"{_fmt(p['pixel_accuracy']):>9}{p['support']:>14}{'yes' if p['scored'] else 'no':>8}")
    lines.append("")
    lines.append(f"DICE {_fmt(sem['dice'])}  mIoU {_fmt(sem['miou'])}  MPA {_fmt(sem['mpa'])}  "
                 f"FwIoU {_fmt(sem['fwiou'])}  (dataset-level confusion matrix)")
    pim = result["per_image_mean"]
    lines.append(f"per-image mean: Dice {_fmt(pim['dice'])}  IoU {_fmt(pim['iou'])}  (n = {pim['n']} images)")
    if "instance" in result:
        ins = result["instance"]
        lines.append(f"instances: AJI {_fmt(ins['aji'])} (n = {ins['aji_n']})  PQ {_fmt(ins['pq'])}  "
                     f"DQ {_fmt(ins['dq'])}  SQ {_fmt(ins['sq'])}  (per-image mean); aggregated: "
                     f"AJI {_fmt(ins['aji_aggregated'])}  PQ {_fmt(ins['pq_aggregated'])}")
        if "mpq" in ins:
            lines.append(f"mPQ {_fmt(ins['mpq'])} (per-image mean, PanNuke)  "
                         f"mPQ aggregated {_fmt(ins['mpq_aggregated'])}")
    if "gland" in result:
        g = result["gland"]
        lines.append(f"glands: F1 {_fmt(g['f1'])}  object Dice {_fmt(g['dice'])}  object Hausdorff "
                     f"{_fmt(g['hausdorff'], pct=False)} px  (per-image mean, n = {g['n']}); aggregated: "
                     f"F1 {_fmt(g['f1_aggregated'])}  Dice {_fmt(g['dice_aggregated'])}  "
                     f"Hausdorff {_fmt(g['hausdorff_aggregated'], pct=False)} px")
    return "\n".join(lines)
