"""benchmarks/choose_class_bias.py: the fitted offsets undo a known shift of the class decision."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest


def _load():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "choose_class_bias.py"
    spec = importlib.util.spec_from_file_location("choose_class_bias", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fit_bias_undoes_an_over_predicted_class():
    mod = _load()
    rng = np.random.default_rng(0)
    truth = rng.choice(3, size=4000, p=[0.7, 0.2, 0.1])
    logits = rng.normal(0.0, 1.0, (3, truth.size))
    logits[truth, np.arange(truth.size)] += 2.0  # informative scores
    logits[1] += 1.5  # then class 1 is pushed up, as class weights do
    log_prob = logits - np.log(np.exp(logits).sum(0, keepdims=True))
    zero = np.zeros(3, np.float32)
    before, _ = mod.foreground_dice(log_prob, truth, zero)
    bias = mod.fit_bias(log_prob, truth, np.arange(-3.0, 3.01, 0.25), rounds=3)
    after, per_class = mod.foreground_dice(log_prob, truth, bias)
    assert bias[0] == 0 and bias[1] < -0.5  # the over-predicted class is pushed back down
    assert after > before + 0.02
    assert per_class.shape == (3,)
    # the mean foreground Dice is evaluate's: classes 1 and 2 only
    assert after == pytest.approx(np.nanmean(per_class[1:]))
