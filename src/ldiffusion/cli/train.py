"""`ldiffusion train`: train a method on a prepared data set into a run folder.

Data-parallel training: start it with `torchrun`, e.g.
`torchrun --standalone --nproc_per_node 2 --no-python ldiffusion train --method unet ...`
(or `python -m torch.distributed.run ... $(which ldiffusion) train ...`). When `WORLD_SIZE > 1`
the command creates the process group (gloo on CPU, NCCL on CUDA with one GPU per process,
`cuda:$LOCAL_RANK`); `train.loop.fit` then splits every batch between the processes and only
rank 0 writes the run folder. See docs/benchmarks.md.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import typer

from ldiffusion.cli._common import DEVICE, METHOD, SEED
from ldiffusion.core.config import load_mapping
from ldiffusion.core.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)


def run_training(method_name: str, data: Path, out: Path, *, preset: str | None = None,
                 config_file: Path | None = None, overrides: list[str] | None = None, resume: bool = False,
                 device: str = "auto", seed: int = 0, max_minutes: float | None = None,
                 annotated_fraction: float = 1.0, autoencoder: Path | None = None,
                 progress: bool = True, overwrite: bool = False,
                 snapshot_minutes: list[float] | None = None) -> Any:
    """Build the data sets and the method, then run `train.loop.fit`; return its `FitResult`.

    Everything is checked before the run folder is touched: the folder (`overwrite` starts over in
    one that holds a run), `annotated_fraction` in (0, 1], the config, every label value of the
    train and validation splits, and, with `resume`, the class count, config and data set
    fingerprint stored in `train_state.pt`. A missing or empty validation split is a warning.
    """
    from ldiffusion.core.device import resolve_device
    from ldiffusion.core.rng import seed_everything
    from ldiffusion.data.dataset import SegmentationDataset, annotated_subset
    from ldiffusion.data.format import read_dataset_info
    from ldiffusion.data.stain_norm import train_split_stats
    from ldiffusion.data.transforms import TrainTransform
    from ldiffusion.methods import METHODS, create_method, resolve_config
    from ldiffusion.train.loop import fit
    from ldiffusion.train.preflight import check_run_folder, scan_training_data

    cls = METHODS.get(method_name)  # unknown method -> ConfigError with the list and a suggestion
    check_run_folder(out, resume=resume, overwrite=overwrite)
    if not 0.0 < annotated_fraction <= 1.0:  # also rejects nan
        raise ConfigError(f"--annotated-fraction {annotated_fraction!r} is out of range; expected a share "
                          "in (0, 1], e.g. 0.25 keeps the labels of a quarter of the training images")
    info = read_dataset_info(data)
    file_cfg = load_mapping(config_file) if config_file is not None else None
    sets = [f"seed={seed}"]
    if max_minutes is not None:
        sets.append(f"max_minutes={max_minutes}")
    if autoencoder is not None:
        names = {f.name for f in dataclasses.fields(cls.config_cls)}
        if "autoencoder" not in names:
            raise ConfigError(
                f"method {method_name!r} does not use a pretrained autoencoder; drop --autoencoder"
            )
        if not (autoencoder / "model.safetensors").is_file():
            raise CheckpointError(f"{autoencoder / 'model.safetensors'}: not found; train one with "
                                  "`ldiffusion train --method autoencoder --out RUN`")
        sets.append(f"autoencoder={autoencoder}")
    cfg = resolve_config(method_name, file_cfg, preset, [*sets, *(overrides or [])])
    dev = resolve_device(device)
    seed_everything(cfg.seed)
    contour_px = cfg.boundary_px if cfg.target == "contour" else None
    class_names = [*info.class_names, "boundary"] if contour_px is not None else info.class_names
    method = create_method(method_name, cfg, num_classes=len(class_names), class_names=class_names)
    divisor = int(getattr(method, "size_divisor", 1))
    if cfg.crop_px % divisor:
        up = -(-cfg.crop_px // divisor) * divisor
        raise ConfigError(f"crop_px={cfg.crop_px} is not a multiple of {divisor}, which method "
                          f"{method_name!r} needs for this config; use e.g. --set crop_px={up}")
    has_val = bool(info.splits.get("val"))
    fingerprint = scan_training_data(data, info, ["train", "val"] if has_val else ["train"])
    if not has_val:
        logger.warning("%s: split 'val' is %s: training without validation, so model.safetensors keeps the "
                       "weights of the last step of each stage (no best-on-validation selection)",
                       data / "dataset.json", "empty" if "val" in info.splits else "missing")
    annotated = None
    if annotated_fraction < 1.0:
        annotated = annotated_subset(info.ids("train"), annotated_fraction, cfg.seed)
    transform = TrainTransform(crop_px=cfg.crop_px, scale_jitter=cfg.scale_jitter, flips=cfg.flips,
                               rot90=cfg.rot90, color_jitter=cfg.color_jitter, stain_jitter=cfg.stain_jitter,
                               stain_bias=cfg.stain_bias)
    split_distance = cfg.contour_fallback_distance if cfg.contour_fallback == "watershed" else None
    train_ds = SegmentationDataset(data, "train", transform=transform, seed=cfg.seed, annotated_ids=annotated,
                                   contour_px=contour_px, contour_split_distance=split_distance,
                                   scale=cfg.input_scale,
                                   separation=(cfg.separation_weight, cfg.separation_sigma_px)
                                   if cfg.separation_weight > 0 else None)
    val_contour_px, val_split = (full_resolution_px(v, cfg.input_scale) for v in (contour_px, split_distance))
    val_ds = (SegmentationDataset(data, "val", contour_px=val_contour_px, contour_split_distance=val_split)
              if has_val else None)
    data_info = {
        "name": info.name,
        "root": str(data),
        "task": info.task,
        "annotated_fraction": annotated_fraction,
        "n_annotated": len(annotated) if annotated is not None else len(info.ids("train")),
    }
    palette = info.palette.tolist() + ([[255, 255, 255]] if contour_px is not None else [])  # boundary: white
    # the training colours, for `predict --stain-normalize RUN` (data.stain_norm.reference_stats)
    stain_reference = train_split_stats(data).to_json()
    method.extra_info = {"data": data_info, "palette": palette, "stain_reference": stain_reference}
    return fit(method, train_ds, val_ds, out, device=dev, generator_seed=cfg.seed, resume=resume,
               progress=progress, run_info={"data": data_info}, overwrite=overwrite,
               data_fingerprint=fingerprint, snapshot_minutes=snapshot_minutes or ())


def full_resolution_px(width: int | None, input_scale: float) -> int | None:
    """Return a width given in working pixels (`input_scale`) in pixels of the files (None stays None).

    Validation is scored at the files' resolution, so its contour band and watershed marker distance
    are the training ones divided by the scale (at least 1 px).

    Example:
        >>> full_resolution_px(3, 0.5), full_resolution_px(None, 0.5), full_resolution_px(2, 1.0)
        (6, None, 2)
    """
    return None if width is None else max(1, round(width / input_scale))


def distributed_device(device: str, environ: Mapping[str, str]) -> tuple[str, int, int]:
    """Return `(device, world_size, local_rank)` from the `torchrun` environment.

    With more than one process, "auto" and "cuda" become `cuda:<LOCAL_RANK>` when CUDA is
    available ("auto" falls back to CPU); an explicit "cuda:N" or "cpu" is kept.
    """
    world_size = int(environ.get("WORLD_SIZE", "1"))
    local_rank = int(environ.get("LOCAL_RANK", "0"))
    if world_size > 1:
        import torch

        name = device.strip().lower()
        if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
            device = f"cuda:{local_rank}"
        elif name == "auto":
            device = "cpu"
    return device, world_size, local_rank


def register(app: typer.Typer) -> None:
    """Add the `train` command to `app`."""

    @app.command("train")
    def train(
        method: str = METHOD,
        data: Path = typer.Option(..., "--data", help="Prepared data set folder (with dataset.json)."),
        out: Path = typer.Option(
            ..., "--out", help="Run folder to write (config.json, model.safetensors, ...)."
        ),
        preset: str = typer.Option(
            None, "--preset", help="Preset: tiny, small or paper (method default: tiny)."
        ),
        config: Path = typer.Option(None, "--config", help="YAML/JSON file of config values."),
        set_: list[str] = typer.Option(
            None, "--set", help="Override a config value: key=value (repeatable)."
        ),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from train_state.pt."),
        overwrite: bool = typer.Option(
            False, "--overwrite", help="Start a new run in an --out folder that already holds one (its "
            "weights, state and log are replaced)."
        ),
        device: str = DEVICE,
        seed: int = SEED,
        max_minutes: float = typer.Option(
            None, "--max-minutes", help="Wall-clock budget per stage, minutes."
        ),
        annotated_fraction: float = typer.Option(
            1.0, "--annotated-fraction", help="Share of training images that keep their labels."
        ),
        autoencoder: Path = typer.Option(None, "--autoencoder", help="Run folder of a trained autoencoder."),
        snapshot_minutes: list[float] = typer.Option(
            None, "--snapshot-minutes", help="Learning-curve point (repeatable): when the last stage has "
            "trained M minutes, keep the weights a --max-minutes M run would keep in OUT/snapshots/<M>min/."
        ),
        no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bar."),
    ) -> None:
        """Train METHOD on DATA; the weights chosen on the validation split go to OUT/model.safetensors.

        Under `torchrun` (WORLD_SIZE > 1) the processes train together (data parallel).

        Example: ldiffusion train --method unet --data data/monuseg --out runs/unet-monuseg --preset small
        """
        device, world_size, local_rank = distributed_device(device, os.environ)
        is_main = True
        if world_size > 1:
            from ldiffusion.core.device import resolve_device
            from ldiffusion.train.distributed import init_distributed

            is_main = init_distributed(resolve_device(device), local_rank=local_rank).is_main
        try:
            result = run_training(method, data, out, preset=preset, config_file=config,
                                  overrides=list(set_ or []), resume=resume, device=device, seed=seed,
                                  max_minutes=max_minutes, annotated_fraction=annotated_fraction,
                                  autoencoder=autoencoder, progress=not no_progress and is_main,
                                  overwrite=overwrite, snapshot_minutes=list(snapshot_minutes or []))
        finally:
            if world_size > 1:
                from ldiffusion.train.distributed import destroy_distributed

                destroy_distributed()
        if is_main:
            score = "n/a" if result.best_score is None else f"{result.best_score:.4f}"
            print(
                f"trained {method} -> {out} (best validation score {score}; weights "
                f"{out / 'model.safetensors'}, log {out / 'metrics.jsonl'})"
            )
        if world_size > 1:
            from ldiffusion.train.distributed import exit_process

            exit_process(0)
