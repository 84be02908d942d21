"""Learning-rate schedules: the cosine formula, the stage progress, and the rates the loop sets."""

from __future__ import annotations

import json
import math

import pytest

from ldiffusion.core.errors import ConfigError
from ldiffusion.data.dataset import SegmentationDataset
from ldiffusion.data.transforms import TrainTransform
from ldiffusion.methods import create_method
from ldiffusion.train.loop import fit
from ldiffusion.train.schedule import schedule_factor, stage_progress

OVR = ["steps=6", "val_every=3", "ckpt_every=2", "batch_size=2", "base=4", "lr=0.002"]


def _fit(root, run, extra=(), **kw):
    train = SegmentationDataset(root, "train", transform=TrainTransform(crop_px=32), seed=0)
    m = create_method("unet", preset="tiny", num_classes=5, overrides=[*OVR, *extra])
    fit(m, train, None, run, generator_seed=0, progress=False, **kw)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"]["model"] for r in recs if r["type"] == "step"}


@pytest.mark.parametrize(("progress", "factor"), [(0.0, 1.0), (0.25, (1 + math.sqrt(0.5)) / 2), (0.5, 0.5),
                                                  (1.0, 0.0), (1.5, 0.0)])
def test_cosine_factor_at_five_points(progress, factor):
    assert schedule_factor("cosine", progress) == pytest.approx(factor, abs=1e-12)
    assert schedule_factor("constant", progress) == 1.0


def test_progress_is_the_larger_share_of_steps_and_minutes():
    assert stage_progress(30, 100, 0.0, None) == pytest.approx(0.3)
    assert stage_progress(30, 100, 60.0, 10.0) == pytest.approx(0.3)  # 1 of 10 minutes: steps bind
    assert stage_progress(30, 100000, 300.0, 10.0) == pytest.approx(0.5)  # 5 of 10 minutes: time binds
    assert stage_progress(200, 100, 0.0, None) == 1.0


def test_the_loop_sets_the_cosine_rate_before_every_step(synth_root, tmp_path):
    lrs = _fit(synth_root, tmp_path / "cos", ["lr_schedule=cosine"])
    # the record of step k carries the rate its update used: progress (k - 1) / 6
    for k in (1, 4, 6):
        assert lrs[k] == pytest.approx(0.002 * (1 + math.cos(math.pi * (k - 1) / 6)) / 2, rel=1e-9)
    assert _fit(synth_root, tmp_path / "const") == dict.fromkeys(range(1, 7), 0.002)


def test_a_time_budget_drives_the_cosine_rate(synth_root, tmp_path):
    # a budget far beyond the run's time: progress is the step share, as without a budget
    lrs = _fit(synth_root, tmp_path / "run", ["lr_schedule=cosine"], max_minutes=1e6)
    assert lrs[4] == pytest.approx(0.002 * (1 + math.cos(math.pi * 3 / 6)) / 2, rel=1e-6)
    # a spent budget: the first step already runs at the end of the schedule
    lrs = _fit(synth_root, tmp_path / "spent", ["lr_schedule=cosine", "steps=1000"], max_minutes=1e-9)
    assert lrs[1] == pytest.approx(0.0, abs=1e-9)


def test_snapshots_are_refused_with_a_cosine_schedule(synth_root, tmp_path):
    train = SegmentationDataset(synth_root, "train", transform=TrainTransform(crop_px=32), seed=0)
    m = create_method("unet", preset="tiny", num_classes=5, overrides=[*OVR, "lr_schedule=cosine"])
    with pytest.raises(ConfigError, match="lr_schedule"):
        fit(m, train, None, tmp_path / "run", progress=False, snapshot_minutes=[1.0])
    assert not (tmp_path / "run").exists()


def test_an_unknown_schedule_is_a_config_error():
    with pytest.raises(ConfigError, match="lr_schedule"):
        create_method("unet", preset="tiny", num_classes=2, overrides=["lr_schedule=poly"])
