"""`ldiffusion evaluate`: score a folder of predicted class maps against a prepared data set."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from ldiffusion.cli._common import PROGRESS

logger = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    """Add the `evaluate` command to `app`."""

    @app.command("evaluate")
    def evaluate(
        pred: Path = typer.Option(..., "--pred",
                                  help="Folder of <id>.png class maps (optional <id>_inst.png)."),
        data: Path = typer.Option(..., "--data", help="Prepared data set folder (holding dataset.json)."),
        out: Path = typer.Option(..., "--out", help="JSON file to write the metrics to (not inside --data; "
                                 "an existing file must be .json)."),
        split: str = typer.Option("test", "--split", help="Split or part to score (test, val, testA, ...)."),
        foreground_only: bool = typer.Option(False, "--foreground-only",
                                             help="Score foreground classes only (class 0 excluded)."),
        binary: bool = typer.Option(False, "--binary",
                                    help="Merge every foreground class into one (truth and predictions) "
                                         "and score background / foreground: a nucleus model on a data "
                                         "set with nucleus types, e.g. a MoNuSeg model on CoNSeP."),
        instances: bool = typer.Option(False, "--instances", help="Also compute AJI, PQ (and mPQ)."),
        watershed: bool = typer.Option(False, "--watershed",
                                       help="Split touching objects (distance-transform watershed) "
                                            "when extracting instances from class maps."),
        min_size: int = typer.Option(10, "--min-size",
                                     help="Drop objects smaller than this (px) when extracting instances "
                                          "from class maps."),
        min_distance: int = typer.Option(3, "--min-distance",
                                         help="With --watershed: minimal distance (px) between the markers "
                                              "(distance-transform maxima); larger values split less."),
        progress: bool = PROGRESS,
    ) -> None:
        """Score predictions: Dice, mIoU, MPA, FwIoU (+ AJI/PQ with --instances, GlaS object metrics).

        Writes the metrics as JSON to --out (fractions in [0, 1]) and prints a table. Exits 2 when a
        prediction is missing or has the wrong size.

        Example: ldiffusion evaluate --pred preds/unet --data data/monuseg --split test
        --out preds/unet/metrics.json --foreground-only --instances
        """
        from ldiffusion.core.errors import InputError
        from ldiffusion.core.io import write_json
        from ldiffusion.eval.report import evaluate_folder, format_table

        if out.is_dir():
            raise InputError(f"--out {out}: is a folder; give a JSON file, e.g. {out}/metrics.json")
        if out.resolve().is_relative_to(data.resolve()):
            raise InputError(f"--out {out}: is inside the data set {data}; write the metrics elsewhere")
        if out.exists() and out.suffix.lower() != ".json":
            raise InputError(f"--out {out}: exists and is not a .json file; refusing to overwrite it")
        result = evaluate_folder(pred, data, split=split, foreground_only=foreground_only,
                                 instances=instances, watershed=watershed, min_size=min_size,
                                 min_distance=min_distance, progress=progress, binary=binary)
        write_json(out, result)
        print(format_table(result))
        print(f"wrote {out}")
