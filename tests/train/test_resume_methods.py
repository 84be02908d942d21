"""Exact resume for the methods not covered elsewhere: L-Diffusion (3 stages), LDSeg, the autoencoder,
the U-Net with its weight average (`ema`), cDAL with its warmed-up average of weights and statistics,
LDSeg with its whole-model average (`ema_scope=all`).

Each run is stopped by `fit(max_steps=...)` (checkpointed as on a wall-clock stop), resumed in a new
method object, and must end with the same weights as an uninterrupted run. For L-Diffusion the stop
falls inside the second stage, so the resume crosses a stage boundary with a partly trained stage.
"""

from __future__ import annotations

import pytest
import torch

from ldiffusion.data.dataset import SegmentationDataset
from ldiffusion.data.transforms import TrainTransform
from ldiffusion.methods import create_method
from ldiffusion.train.loop import fit

CASES = {
    # method: (overrides, crop, stop after this many optimiser steps, total steps)
    "ldiffusion": (["ae_steps=2", "diffusion_steps=2", "seg_steps=2", "val_every=0", "ckpt_every=1",
                    "batch_size=2", "ae_batch_size=2", "crt_resolution=32"], 32, 3, 6),
    "ldseg": (["steps=4", "val_every=2", "ckpt_every=1", "batch_size=2", "ema=0.9", "ema_scope=all"],
              64, 2, 4),
    "autoencoder": (["steps=4", "val_every=2", "ckpt_every=1", "batch_size=2"], 32, 3, 4),
    "cdal": (["steps=5", "val_every=2", "ckpt_every=1", "batch_size=2", "attn_scale=8", "ema=0.9",
              "ema_warmup=true", "ema_buffers=average", "g_backbone=resnet18"], 32, 3, 5),
    "unet": (["steps=5", "val_every=2", "ckpt_every=1", "batch_size=2", "ema=0.9"], 32, 3, 5),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_interrupted_run_resumes_to_identical_weights(name, synth_root, tmp_path):
    overrides, crop, stop, total = CASES[name]
    train = SegmentationDataset(synth_root, "train", transform=TrainTransform(crop_px=crop), seed=0)
    val = SegmentationDataset(synth_root, "val")

    def make():
        return create_method(name, preset="tiny", num_classes=5, overrides=[*overrides, f"crop_px={crop}"])

    full = make()
    r_full = fit(full, train, val, tmp_path / "full", generator_seed=3, progress=False)
    assert r_full.finished

    part = make()
    r = fit(part, train, val, tmp_path / "part", generator_seed=3, progress=False, max_steps=stop)
    assert not r.finished and r.steps_run == stop
    p, f = part.state_dict(), full.state_dict()
    assert any(not torch.equal(p[k], f[k]) for k in f), "the stop came too late to test anything"
    resumed = make()
    r2 = fit(resumed, train, val, tmp_path / "part", generator_seed=3, progress=False, resume=True)
    assert r2.finished and r2.steps_run == total - stop

    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"{name}: {len(differing)} tensors differ after resume, e.g. {differing[:3]}"
