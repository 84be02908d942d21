"""`ldiffusion data check DIR`: validate a prepared data set and list every problem."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from ldiffusion.data.check import format_problems, validate
from ldiffusion.data.format import SPLITS, read_dataset_info

logger = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    """Add the `check` command to the `data` group `app`."""

    @app.command("check")
    def check(
        root: Path = typer.Argument(..., help="Prepared data set folder (the one holding dataset.json)."),
        strict: bool = typer.Option(False, "--strict", help="Also fail on warnings (orphan files)."),
    ) -> None:
        """Validate a data set folder: dataset.json, splits, files, sizes and label values.

        Prints "OK: <name>, N images (train a / val b / test c), K classes" and exits 0, or one
        line per problem ("<file>: <message>") and exits 2. Orphan files (in no split) are
        warnings: they are printed but fail only with --strict.

        Example: ldiffusion data check data/monuseg
        """
        problems = validate(root)
        errors = [p for p in problems if p.level == "error" or strict]
        if problems:
            print(format_problems(problems))
        if errors:
            raise typer.Exit(2)
        info = read_dataset_info(root)
        counts = {s: len(info.splits.get(s, [])) for s in SPLITS}
        total = len({i for ids in info.splits.values() for i in ids})
        print(
            f"OK: {info.name}, {total} images (train {counts['train']} / val {counts['val']} / "
            f"test {counts['test']}), {info.num_classes} classes"
        )
