"""`ldiffusion predict`: class maps (and overlays) for a data set split or image files."""

from __future__ import annotations

from pathlib import Path

import typer

from ldiffusion.cli._common import DEVICE, SEED
from ldiffusion.core.errors import InputError


def register(app: typer.Typer) -> None:
    """Add the `predict` command to `app`."""

    @app.command("predict")
    def predict(
        run: Path = typer.Argument(..., help="Run folder (config.json + model.safetensors)."),
        images: list[Path] = typer.Argument(None, help="Image files or folders (instead of --data)."),
        data: Path = typer.Option(None, "--data", help="Prepared data set folder."),
        split: str = typer.Option("test", "--split", help="Split of --data to predict."),
        out: Path = typer.Option(..., "--out", help="Output folder (not the inputs' folder, not the data "
                                 "set's images/labels)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace files in --out that an earlier "
                                       "`predict` did not write (it always replaces its own)."),
        samples: int = typer.Option(None, "--samples", help="Draws of stochastic methods (method default)."),
        tile: int = typer.Option(None, "--tile", help="Tile side in px (default: the training crop; at least "
                                 "512 px or the whole image up to 1024 px for the ResNet U-Net)."),
        overlap: int = typer.Option(None, "--overlap", help="Tile overlap in px (default: tile / 4)."),
        batch_size: int = typer.Option(4, "--batch-size", help="Tiles per forward pass."),
        device: str = DEVICE,
        seed: int = SEED,
        uncertainty: bool = typer.Option(False, "--uncertainty/--no-uncertainty",
                                         help="Also write <id>_unc.png uncertainty maps."),
        save_prob: bool = typer.Option(False, "--save-prob", help="Also write <id>_prob.npy probabilities."),
        tta: bool = typer.Option(False, "--tta", help="Test-time augmentation: average the 8 flips / "
                                 "90-degree rotations of every tile (8x slower)."),
        stain_normalize: Path = typer.Option(
            None, "--stain-normalize", metavar="REF",
            help="Map each image's colours (L*a*b* mean and SD of its stained pixels) onto those of REF "
                 "before predicting (Reinhard). REF: the run folder itself (the training colours stored "
                 "by `train`), a prepared data set folder (its train split) or an image file. For images "
                 "stained or scanned elsewhere."),
        set_: list[str] = typer.Option(None, "--set",
                                       help="Inference-time config change key=value (repeatable), e.g. "
                                            "ddim_steps=6 (LDSeg), n_samples=5, precision=fp32."),
        no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bar."),
    ) -> None:
        """Predict class maps <id>.png and overlays <id>_overlay.png into OUT.

        Example: ldiffusion predict runs/unet-monuseg --data data/monuseg --split test --out preds/unet
        """
        from ldiffusion.core.device import resolve_device
        from ldiffusion.infer.predict import predict_folder
        from ldiffusion.methods import load_segmenter

        if data is None and not images:
            raise InputError("nothing to predict: give --data DATASET [--split test] or image files/folders")
        stain_target = None
        if stain_normalize is not None:
            from ldiffusion.data.stain_norm import reference_stats

            stain_target = reference_stats(stain_normalize)
        segmenter = load_segmenter(run, resolve_device(device), overrides=list(set_ or []))
        ids = predict_folder(segmenter, out, images=images or None, data_root=data, split=split, tile_px=tile,
                             overlap_px=overlap, batch_size=batch_size, seed=seed, n_samples=samples,
                             save_prob=save_prob, save_uncertainty=uncertainty, progress=not no_progress,
                             tta=tta, overwrite=overwrite, stain_target=stain_target)
        print(f"wrote {len(ids)} class maps and overlays to {out}")
