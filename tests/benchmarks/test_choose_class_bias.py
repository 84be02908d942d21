"""benchmarks/choose_class_bias.py: the fitted offsets undo a known shift of the class decision."""

from __future__ import annotations

import numpy as np
import pytest

from tests.benchmarks._scripts import load_script


def test_fit_bias_undoes_an_over_predicted_class():
    mod = load_script("choose_class_bias")
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


def test_set_reaches_the_validation_prediction(synth_root, tmp_path, drop_cli_log_handlers):
    """`--set mean_map=softmax` makes LDSeg save soft maps (one-hot masks without it) and is echoed back."""
    import json

    from ldiffusion.cli import main as cli

    run = tmp_path / "run"
    assert cli(["train", "--method", "ldseg", "--preset", "tiny", "--data", str(synth_root),
                "--out", str(run), "--set", "steps=2", "--set", "val_every=0", "--no-progress",
                "--device", "cpu"]) == 0
    mod = load_script("choose_class_bias")
    fast = ["--grid", "-0.5", "0.5", "0.5", "--rounds", "1"]
    cases = (([], "pred-val-prob"), (["--set", "mean_map=softmax"], "pred-val-prob-mean_map=softmax"))
    for extra, folder in cases:
        out = tmp_path / f"{folder}.json"
        assert mod.main(["--run", str(run), "--data", str(synth_root), *fast, *extra, "--out", str(out)]) == 0
        probs = np.stack([np.load(p) for p in sorted((run / folder).glob("*_prob.npy"))])
        soft = bool(((probs > 0.01) & (probs < 0.99)).any())
        assert soft == bool(extra)  # one-hot masks of one sample without the key, soft maps with it
        res = json.loads(out.read_text())
        assert res["overrides"] == extra[1:]
        first = "--predict-set mean_map=softmax " if extra else ""
        assert res["predict_set"].startswith(first + "--predict-set class_bias=[")


def test_objective_all_does_not_flood_the_background_with_a_rare_class():
    """A class whose few true pixels look like background: the foreground objective buys its Dice by giving
    it the whole background (invisible to the foreground mean); the default objective counts that loss."""
    mod = load_script("choose_class_bias")
    truth = np.array([0] * 8000 + [1] * 1990 + [2] * 10)
    log_prob = np.empty((3, truth.size))
    log_prob[:, truth != 1] = np.array([[0.0], [-5.0], [-6.0]])  # background and class 2 alike
    log_prob[:, truth == 1] = np.array([[-5.0], [0.0], [-12.0]])
    grid = np.arange(-8.0, 8.01, 0.5)
    flood = mod.fit_bias(log_prob, truth, grid, rounds=2, objective_name="foreground")
    kept = mod.fit_bias(log_prob, truth, grid, rounds=2)
    for bias, n_class2 in ((flood, 8010), (kept, 0)):
        pred = np.argmax(log_prob + bias[:, None], 0)
        assert int((pred == 2).sum()) == n_class2
    _, dice = mod.foreground_dice(log_prob, truth, flood)
    assert dice[0] == 0.0 and dice[1] == 1.0  # the flood cost the background everything, class 1 nothing
    with pytest.raises(ValueError, match="objective"):
        mod.objective(log_prob, truth, kept, "median")
