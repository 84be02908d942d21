"""End-to-end through the command line, in-process: train -> predict -> files; error paths exit 2."""

from __future__ import annotations

import json

import pytest

from ldiffusion.cli import main

pytestmark = pytest.mark.e2e


def test_train_then_predict(synth_root, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--method", "unet", "--data", str(synth_root), "--out", str(run), "--preset", "tiny",
            "--set", "steps=4", "--set", "val_every=2", "--set", "base=4", "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    for f in ("config.json", "model.safetensors", "train_state.pt", "metrics.jsonl", "config.resolved.json"):
        assert (run / f).is_file()
    assert json.loads((run / "config.resolved.json").read_text())["config"]["steps"] == 4
    # same folder again without --resume: a clear error
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    # --resume of a finished run is a no-op that succeeds
    assert main([*args, "--resume"]) == 0
    out = tmp_path / "pred"
    assert main(["predict", str(run), "--data", str(synth_root), "--split", "test", "--out", str(out),
                 "--uncertainty", "--no-progress", "--device", "cpu"]) == 0
    test_ids = json.loads((synth_root / "dataset.json").read_text())["splits"]["test"]
    for i in test_ids:
        assert (out / f"{i}.png").is_file() and (out / f"{i}_overlay.png").is_file()
        assert (out / f"{i}_unc.png").is_file()
    img = synth_root / "images" / f"{test_ids[0]}.png"
    assert main(["predict", str(run), str(img), "--out", str(tmp_path / "p2"), "--no-progress"]) == 0
    assert (tmp_path / "p2" / f"{test_ids[0]}.png").is_file()
    # inference-time config changes: a valid one runs, an unknown key and a shape change exit 2
    assert main(["predict", str(run), str(img), "--out", str(tmp_path / "p3"), "--set", "precision=bf16",
                 "--no-progress"]) == 0
    assert (tmp_path / "p3" / f"{test_ids[0]}.png").is_file()
    capsys.readouterr()
    assert main(["predict", str(run), str(img), "--out", str(tmp_path / "p4"), "--set", "ddim_stepz=3",
                 "--no-progress"]) == 2
    assert "ddim_stepz" in capsys.readouterr().err
    assert main(["predict", str(run), str(img), "--out", str(tmp_path / "p5"), "--set", "base=8",
                 "--no-progress"]) == 2
    assert "do not fit" in capsys.readouterr().err
    assert not (tmp_path / "p5" / f"{test_ids[0]}.png").exists()


def test_error_paths_exit_2(synth_root, tmp_path, capsys):
    assert main(["train", "--method", "unett", "--data", str(synth_root), "--out", str(tmp_path / "r")]) == 2
    assert "did you mean 'unet'" in capsys.readouterr().err
    assert (
        main(["train", "--method", "unet", "--data", str(tmp_path / "nodata"), "--out", str(tmp_path / "r")])
        == 2
    )
    assert main(["train", "--method", "unet", "--data", str(synth_root), "--out", str(tmp_path / "r"),
                 "--set", "stpes=3"]) == 2
    assert "stpes" in capsys.readouterr().err
    assert (
        main(["predict", str(tmp_path / "norun"), "--data", str(synth_root), "--out", str(tmp_path / "p")])
        == 2
    )
    assert "norun" in capsys.readouterr().err


def test_contour_target_end_to_end(synth_root, tmp_path):
    """train --set target=contour -> predict writes instance maps -> evaluate --instances reads them."""
    import numpy as np

    from ldiffusion.data.format import read_mask

    assert (synth_root / "instances").is_dir()
    run = tmp_path / "run"
    assert main(["train", "--method", "unet", "--data", str(synth_root), "--out", str(run),
                 "--preset", "tiny", "--set", "steps=3", "--set", "val_every=3", "--set", "target=contour",
                 "--no-progress",
                 "--device", "cpu"]) == 0
    k = len(json.loads((synth_root / "dataset.json").read_text())["classes"])
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["num_classes"] == k + 1 and cfg["class_names"][-1] == "boundary"
    assert len(cfg["palette"]) == k + 1
    pred = tmp_path / "pred"
    assert main(["predict", str(run), "--data", str(synth_root), "--split", "test", "--out", str(pred),
                 "--no-progress", "--device", "cpu"]) == 0
    first = json.loads((synth_root / "dataset.json").read_text())["splits"]["test"][0]
    mask = read_mask(pred / f"{first}.png")
    assert mask.max() < k  # the data set's classes: the boundary is given back to the objects
    inst = read_mask(pred / f"{first}_inst.png")
    assert inst.shape == mask.shape and np.array_equal(inst > 0, mask > 0) and inst.max() > 0
    assert main(["evaluate", "--pred", str(pred), "--data", str(synth_root), "--split", "test",
                 "--instances", "--out", str(tmp_path / "eval.json"), "--no-progress"]) == 0
    # min_object_px (an inference-time key) drops every object smaller than the image
    big = tmp_path / "pred-big"
    assert main(["predict", str(run), "--data", str(synth_root), "--split", "test", "--out", str(big),
                 "--no-progress", "--device", "cpu", "--set", "min_object_px=100000"]) == 0
    assert read_mask(big / f"{first}_inst.png").max() == 0 and read_mask(big / f"{first}.png").max() == 0
    # the marker keys are inference-time keys too: a full-image erosion leaves every object marker-less,
    # so each connected object is one instance, and the objects (the class map) do not change
    eroded = tmp_path / "pred-eroded"
    assert main(["predict", str(run), "--data", str(synth_root), "--split", "test", "--out", str(eroded),
                 "--no-progress", "--device", "cpu", "--set", "marker_erosion_px=256",
                 "--set", "marker_threshold=0.5"]) == 0
    assert np.array_equal(read_mask(eroded / f"{first}.png") > 0, mask > 0)
    assert read_mask(eroded / f"{first}_inst.png").max() <= inst.max()


def test_separation_weight_trains_the_unet_and_is_refused_elsewhere(synth_root, tmp_path, capsys):
    """--set separation_weight=W weights the U-Net's cross-entropy; other methods exit 2 naming the key."""
    run = tmp_path / "run"
    assert main(["train", "--method", "unet", "--data", str(synth_root), "--out", str(run),
                 "--preset", "tiny", "--set", "steps=2", "--set", "val_every=2", "--set", "target=contour",
                 "--set", "separation_weight=10", "--set", "separation_sigma_px=3", "--no-progress",
                 "--device", "cpu"]) == 0
    assert json.loads((run / "config.json").read_text())["config"]["separation_weight"] == 10
    assert main(["train", "--method", "cdal", "--data", str(synth_root), "--out", str(tmp_path / "c"),
                 "--preset", "tiny", "--set", "steps=2", "--set", "separation_weight=10", "--no-progress",
                 "--device", "cpu"]) == 2
    assert "separation_weight" in capsys.readouterr().err
