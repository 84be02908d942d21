"""`ldiffusion data synth OUT`: write the synthetic H&E-like data set."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from ldiffusion.data.synth import make_synthetic_dataset

logger = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    """Add the `synth` command to the `data` group `app`."""

    @app.command("synth")
    def synth(
        out: Path = typer.Argument(..., help="Output folder (created; a synthetic set there is replaced)."),
        n: int = typer.Option(40, "--n", help="Number of images."),
        size: int = typer.Option(128, "--size", help="Image side in pixels (>= 16)."),
        seed: int = typer.Option(0, "--seed", help="Seed; the same seed writes byte-identical files."),
        force: bool = typer.Option(False, "--force",
                                   help="Replace a data set in OUT written by another command (a synthetic "
                                        "set is replaced without it; a folder that is no data set never)."),
    ) -> None:
        """Write a synthetic H&E-like instance data set (5 classes, nuclei instances) to OUT.

        Classes: 0 background (and gland lumen), 1 stroma, 2 nucleus, 3 gland epithelium,
        4 necrosis (rare, ~20% of the images). Use it for smoke tests and demos.

        Example: ldiffusion data synth data/synth --n 40 --size 128 --seed 0
        """
        info = make_synthetic_dataset(out, n=n, size=size, seed=seed, force=force)
        c = {s: len(v) for s, v in info.splits.items()}
        print(
            f"wrote {info.name} to {out}: {n} images of {size} px (train {c['train']} / val {c['val']} / "
            f"test {c['test']}), {info.num_classes} classes {info.class_names}, seed {seed}"
        )
