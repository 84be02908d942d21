"""The training loop: determinism, exact resume, validation selection, logs, wall-clock budget."""

from __future__ import annotations

import json

import pytest
import torch

from ldiffusion.core.errors import CheckpointError
from ldiffusion.core.io import load_weights
from ldiffusion.data.dataset import SegmentationDataset
from ldiffusion.data.transforms import TrainTransform
from ldiffusion.methods import create_method
from ldiffusion.train.loop import fit

OVR = ["steps=6", "val_every=3", "ckpt_every=2", "batch_size=2", "base=4"]


def _data(root):
    train = SegmentationDataset(root, "train", transform=TrainTransform(crop_px=32), seed=0)
    val = SegmentationDataset(root, "val")
    return train, val


def _method(extra=()):
    return create_method("unet", preset="tiny", num_classes=5, overrides=[*OVR, *extra])


def _records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_gives_identical_weights(synth_root, tmp_path):
    train, val = _data(synth_root)
    full = _method()
    fit(full, train, val, tmp_path / "full", generator_seed=1, progress=False)

    part = _method()
    r = fit(part, train, val, tmp_path / "part", generator_seed=1, progress=False, max_steps=3)
    assert not r.finished and r.steps_run == 3
    resumed = _method()
    r2 = fit(resumed, train, val, tmp_path / "part", generator_seed=1, progress=False, resume=True)
    assert r2.finished and r2.steps_run == 3
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    a = load_weights(tmp_path / "full" / "model.safetensors")
    b = load_weights(tmp_path / "part" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in _records(tmp_path / "full")]
    strip2 = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in _records(tmp_path / "part")]
    assert strip == strip2


def test_keyboard_interrupt_checkpoints_and_resumes(synth_root, tmp_path):
    train, val = _data(synth_root)
    full = _method()
    fit(full, train, val, tmp_path / "full", generator_seed=0, progress=False)

    def stop_at_4(rec):
        if rec["type"] == "step" and rec["step"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(_method(), train, val, tmp_path / "run", generator_seed=0, progress=False, callback=stop_at_4)
    with pytest.raises(CheckpointError, match="resume"):
        fit(_method(), train, val, tmp_path / "run", generator_seed=0, progress=False)
    resumed = _method()
    fit(resumed, train, val, tmp_path / "run", generator_seed=0, progress=False, resume=True)
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in full.state_dict().items())


def test_same_seed_same_weights_and_different_seed_differs(synth_root, tmp_path):
    train, _ = _data(synth_root)
    a, b, c = _method(), _method(), _method()
    for m, d, s in ((a, "a", 0), (b, "b", 0), (c, "c", 5)):
        fit(m, train, None, tmp_path / d, generator_seed=s, progress=False)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())


def test_validation_selection_logs_and_run_folder(synth_root, tmp_path):
    train, val = _data(synth_root)
    m = _method()
    res = fit(m, train, val, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    for f in ("config.json", "model.safetensors", "train_state.pt", "metrics.jsonl", "config.resolved.json"):
        assert (run / f).is_file(), f
    recs = _records(run)
    steps = [r for r in recs if r["type"] == "step"]
    vals = [r for r in recs if r["type"] == "val"]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert all({"stage", "losses", "lr", "elapsed_s"} <= set(r) for r in steps)
    assert [r["step"] for r in vals] == [3, 6]
    assert res.best_score == max(r["val_dice"] for r in vals)
    # the saved weights are the best-on-validation ones: re-scoring them gives the best score
    from torch.utils.data import DataLoader

    from ldiffusion.methods import load_segmenter
    from ldiffusion.train.loop import _to_device

    best = load_segmenter(run)
    score = best.validation_score((_to_device(b, torch.device("cpu")) for b in DataLoader(val, batch_size=1)),
                                  torch.Generator(), "main")
    assert score == pytest.approx(res.best_score, abs=1e-9)
    info = json.loads((run / "config.json").read_text())
    assert info["method"] == "unet" and info["num_classes"] == 5 and "ldiffusion_version" in info
    resolved = json.loads((run / "config.resolved.json").read_text())
    assert resolved["config"]["steps"] == 6 and resolved["seed"] == 0


def test_max_minutes_stops_stage_cleanly(synth_root, tmp_path):
    train, _ = _data(synth_root)
    m = create_method("unet", preset="tiny", num_classes=5, overrides=[*OVR, "steps=1000"])
    res = fit(m, train, None, tmp_path / "run", progress=False, max_minutes=1e-6)
    assert res.finished and res.stopped_by_budget == ["main"] and res.steps_run == 1
    assert (tmp_path / "run" / "model.safetensors").is_file()
    state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=False)
    assert state["stage_index"] == 1


def test_snapshot_equals_the_shorter_run(synth_root, tmp_path):
    train, val = _data(synth_root)
    short = fit(_method(), train, val, tmp_path / "short", progress=False, max_minutes=1e-7)
    assert short.steps_run == 1
    fit(_method(), train, val, tmp_path / "long", progress=False, snapshot_minutes=[1e-7, 1e9])
    snaps = sorted(p.name for p in (tmp_path / "long" / "snapshots").iterdir())
    assert snaps == ["1e-07min"]  # the 1e9-minute point is never reached
    info = json.loads((tmp_path / "long" / "snapshots" / "1e-07min" / "snapshot.json").read_text())
    assert info["step"] == 1 and info["best_step"] == 1
    a = load_weights(tmp_path / "short" / "model.safetensors")
    b = load_weights(tmp_path / "long" / "snapshots" / "1e-07min" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_snapshot_minutes_must_be_positive(synth_root, tmp_path):
    from ldiffusion.core.errors import ConfigError

    train, val = _data(synth_root)
    with pytest.raises(ConfigError, match="snapshot"):
        fit(_method(), train, val, tmp_path / "run", progress=False, snapshot_minutes=[0.0])
    assert not (tmp_path / "run").exists()


def test_unannotated_images_skipped_by_segmenter_stage(synth_root, tmp_path):
    from ldiffusion.train.loop import _annotated_indices

    ds = SegmentationDataset(
        synth_root, "train", annotated_ids={SegmentationDataset(synth_root, "train").ids[0]}
    )
    assert _annotated_indices(ds) == [0]


class _TwoStageUNet:
    """Factory for a U-Net whose 'first' stage scores far above anything the 'main' stage reaches."""

    @staticmethod
    def build():
        from ldiffusion.methods.base import Stage

        method = _method(["val_every=0"])
        base_stages, base_score = method.stages, method.validation_score

        def stages():
            (main,) = base_stages()
            first = Stage(
                name="first", optimizers=main.optimizers, steps=2, batch_size=2, selects_on_val=False
            )
            return [first, main]

        def validation_score(batches, generator, stage):
            score = base_score(batches, generator, stage)
            return 100.0 + score if stage == "first" else score

        method.stages, method.validation_score = stages, validation_score
        return method


def test_each_stage_selects_on_its_own_score(synth_root, tmp_path):
    """A later stage's best weights are saved even when an earlier stage logged a higher score."""
    train, val = _data(synth_root)
    method = _TwoStageUNet.build()
    r = fit(method, train, val, tmp_path / "run", generator_seed=0, progress=False)
    vals = [x for x in _records(tmp_path / "run") if x["type"] == "val"]
    main_vals = [x for x in vals if x["stage"] == "main"]
    assert main_vals and main_vals[0]["best"] is True  # the first main validation starts a fresh best
    assert r.best_score == pytest.approx(max(x["val_dice"] for x in main_vals))
    assert r.best_score < 100.0


def test_a_stage_budget_replaces_the_run_budget_for_that_stage_only(synth_root, tmp_path):
    """L-Diffusion's per-stage minutes: the autoencoder stops at its own tiny budget, the diffusion stage
    runs all its steps under no budget, and the segmenter's own generous budget overrides a tiny run
    budget."""
    train = SegmentationDataset(synth_root, "train", transform=TrainTransform(crop_px=32), seed=0)
    over = ["ae_steps=3", "diffusion_steps=3", "seg_steps=3", "val_every=0", "batch_size=2",
            "ae_batch_size=2", "crt_resolution=32", "crop_px=32", "ae_max_minutes=1e-7",
            "seg_max_minutes=1e9"]
    m = create_method("ldiffusion", preset="tiny", num_classes=5, overrides=over)
    assert [s.max_minutes for s in m.stages()] == [1e-7, None, 1e9]
    res = fit(m, train, None, tmp_path / "run", progress=False)
    assert res.stopped_by_budget == ["autoencoder"]
    ends = {r["stage"]: r["step"] for r in _records(tmp_path / "run") if r["type"] == "stage_end"}
    assert ends == {"autoencoder": 1, "diffusion": 3, "segmenter": 3}
    m2 = create_method("ldiffusion", preset="tiny", num_classes=5, overrides=over)
    res2 = fit(m2, train, None, tmp_path / "run2", progress=False, max_minutes=1e-7)
    assert res2.stopped_by_budget == ["autoencoder", "diffusion"]  # the segmenter keeps its own 1e9 min
    ends2 = {r["stage"]: r["step"] for r in _records(tmp_path / "run2") if r["type"] == "stage_end"}
    assert ends2 == {"autoencoder": 1, "diffusion": 1, "segmenter": 3}


def test_apply_losses_skips_an_optimiser_whose_loss_has_no_grad():
    from ldiffusion.methods.base import OptimizerSpec
    from ldiffusion.train.loop import apply_losses

    a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    specs = {"a": OptimizerSpec(list(a.parameters()), 0.1), "b": OptimizerSpec(list(b.parameters()), 0.1)}
    opts = {k: torch.optim.Adam(s.params, s.lr) for k, s in specs.items()}
    before_a = [p.detach().clone() for p in a.parameters()]
    before_b = [p.detach().clone() for p in b.parameters()]
    x = torch.ones(1, 2)
    apply_losses({"a": torch.zeros(()), "b": b(x).sum()}, specs, opts, None, "main", 0)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before_a, strict=True))
    assert not opts["a"].state  # no Adam moments for the skipped optimiser
    assert not all(torch.equal(p, q) for p, q in zip(b.parameters(), before_b, strict=True))
    with pytest.raises(RuntimeError, match="no loss"):
        apply_losses({"a": torch.zeros(()), "b": torch.zeros(())}, specs, opts, None, "main", 1)
