"""benchmarks/choose_predict_set.py: candidates, the tie rule, test splits refused, nothing left behind."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks._scripts import load_script


def test_candidates_and_the_tie_rule():
    mod = load_script("choose_predict_set")
    assert mod.parse_candidate("none") == []
    assert mod.parse_candidate("n_samples=8, mean_map=softmax") == ["n_samples=8", "mean_map=softmax"]
    assert mod.parse_candidate("tta") == ["tta"]
    for bad in ("n_samples", "=3", "", "flips"):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            mod.parse_candidate(bad)
    # the first candidate within the tolerance of the best wins; undefined scores are skipped
    assert mod.choose([0.70, 0.75, 0.752], 0.003) == 1
    assert mod.choose([0.70, 0.75, 0.76], 0.003) == 2
    assert mod.choose([None, 0.5], 0.0) == 1
    with pytest.raises(ValueError):
        mod.choose([None, None], 0.01)


def test_refuses_the_test_split_and_an_existing_output(tmp_path, capsys):
    mod = load_script("choose_predict_set")
    assert mod.main(["--run", str(tmp_path), "--data", str(tmp_path), "--split", "testA",
                     "--candidate", "none"]) == 2
    assert "validation split" in capsys.readouterr().err
    out = tmp_path / "exists.json"
    out.write_text("{}")
    assert mod.main(["--run", str(tmp_path), "--data", str(tmp_path), "--candidate", "none",
                     "--out", str(out)]) == 2
    assert out.read_text() == "{}"
    assert mod.main(["--run", str(tmp_path), "--data", str(tmp_path), "--candidate", "n_samples"]) == 2
    assert mod.main(["--run", str(tmp_path), "--data", str(tmp_path), "--candidate", "none",
                     "--fixed", "tta"]) == 2
    capsys.readouterr()
    # a folder that is no run: one error line naming it, exit code 2, no traceback
    assert mod.main(["--run", str(tmp_path / "norun"), "--data", str(tmp_path), "--candidate", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "norun" in err[0]


def test_scores_each_candidate_on_validation_and_writes_nothing_into_the_run(synth_root, tmp_path,
                                                                            drop_cli_log_handlers):
    from ldiffusion.cli import main as cli

    run = tmp_path / "run"
    assert cli(["train", "--method", "ldseg", "--preset", "tiny", "--data", str(synth_root),
                "--out", str(run), "--set", "steps=2", "--set", "val_every=0", "--no-progress",
                "--device", "cpu"]) == 0
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    mod = load_script("choose_predict_set")
    out = tmp_path / "choice.json"
    assert mod.main(["--run", str(run), "--data", str(synth_root), "--candidate", "none",
                     "--candidate", "n_samples=2,mean_map=softmax", "--candidate", "tta",
                     "--tolerance", "1.0", "--out", str(out)]) == 0
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    res = json.loads(out.read_text())
    assert [r["candidate"] for r in res["scores"]] == [[], ["n_samples=2", "mean_map=softmax"], ["tta"]]
    assert res["scores"][2]["overrides"] == []  # tta is a predict flag, not a config key
    assert all(0.0 <= r["score"] <= 1.0 for r in res["scores"])
    assert res["split"] == "val" and res["metric"] == "dice"
    # a tolerance of 1 ties everything, so the first (cheapest) candidate is chosen
    assert res["chosen"] == [] and res["predict_set"] == ""
