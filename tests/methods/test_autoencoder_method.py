"""The autoencoder method (L-Diffusion stage 0) trained alone."""

from __future__ import annotations

import torch

from ldiffusion.data.dataset import SegmentationDataset
from ldiffusion.data.transforms import TrainTransform
from ldiffusion.methods import create_method, load_segmenter
from ldiffusion.train.loop import fit

PSNR_BAR_DB = 18.0  # tiny AE, 100 steps on 64 px synthetic tiles reaches ~23 dB; the bar leaves margin


def test_tiny_autoencoder_reaches_psnr_and_sets_scaling(synth_root, tmp_path):
    m = create_method("autoencoder", preset="tiny", num_classes=5)
    train = SegmentationDataset(synth_root, "train", transform=TrainTransform(crop_px=64), seed=0,
                                annotated_ids=set())  # labels withheld: the AE still trains on all images
    val = SegmentationDataset(synth_root, "val")
    res = fit(m, train, val, tmp_path / "ae", progress=False)
    assert res.best_score is not None and res.best_score > PSNR_BAR_DB
    assert m.scaling_factor != 1.0
    loaded = load_segmenter(tmp_path / "ae")
    assert loaded.scaling_factor == m.scaling_factor
    x = val[0]["image"][None]
    assert torch.equal(loaded.reconstruct(x), m.eval().reconstruct(x))
