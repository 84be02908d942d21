"""benchmarks/module_times.py: per-module forward times of one training step."""

from __future__ import annotations

from tests.benchmarks._scripts import load_script


def test_module_times_reports_every_child_and_the_override_takes_effect():
    mod = load_script("module_times")
    r = mod.module_times("ldseg", "tiny", ["decoder_widths=[4,4,4,4]"], num_classes=3, warmup=0, steps=2)
    assert set(r["modules"]) >= {"label_encoder", "image_encoder", "denoiser", "decoder"}
    assert r["forward"] > 0 and r["backward"] > 0
    # the children's own forward calls fit inside the whole forward pass
    assert sum(r["modules"].values()) <= r["forward"]
    assert (r["batch"], r["crop_px"], r["steps"]) == (4, 64, 2)


def test_module_times_refuses_zero_steps(capsys):
    assert load_script("module_times").main(["--method", "ldseg", "--preset", "tiny", "--steps", "0"]) == 2
    assert "--steps 0" in capsys.readouterr().err
