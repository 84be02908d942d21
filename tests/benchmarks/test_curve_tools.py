"""benchmarks/label_oracle.py, plot_curves.py, choose_min_object.py: block majority, curve points, choice."""

from __future__ import annotations

import numpy as np

from tests.benchmarks._scripts import load_script

label_oracle = load_script("label_oracle")


def test_block_majority():
    lab = np.array([[1, 1, 2, 0, 3],
                    [1, 0, 2, 2, 3],
                    [0, 0, 0, 2, 0]])
    out = label_oracle.block_majority(lab, 2, 4)
    # blocks: [1,1,1,0] -> 1; [2,0,2,2] -> 2; [3,3 + pad 0,0] -> tie 0/3 -> 0; bottom row padded with 0
    assert out.tolist() == [[1, 1, 2, 2, 0], [1, 1, 2, 2, 0], [0, 0, 0, 0, 0]]


def test_stride_one_is_exact_and_coarser_is_worse(synth_root):
    exact = label_oracle.oracle(synth_root, "val", 1, None)
    coarse = label_oracle.oracle(synth_root, "val", 16, None)
    assert exact["dice"] == 1.0 and coarse["dice"] < 1.0


def test_plot_curves_points(tmp_path):
    plot_curves = load_script("plot_curves")
    import json

    res = {"command": "python benchmarks/accuracy.py --max-minutes 30 --tag curve", "results": [
        {"method": "unet", "tag": "curve", "scores": {"test": {"dice": 0.5}}},
        {"method": "unet", "tag": "curve", "snapshot_minutes": 10, "scores": {"test": {"dice": 0.25}}},
        {"method": "cdal", "tag": "b6-curve", "scores": {"test": {"dice": None}}}]}
    (tmp_path / "r.json").write_text(json.dumps(res))
    assert plot_curves.points([tmp_path / "r.json"], "test", "dice") == {"unet": [(10.0, 25.0), (30.0, 50.0)]}
    # a three-stage method: separate runs of one curve (tags curve-10, curve-30) at 3 x the per-stage budget
    for name, budget, dice in (("a", 3.33, 0.2), ("b", 10, 0.3)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"max_minutes": budget, "results": [
            {"method": "ldiffusion", "tag": f"nostain-curve-{round(3 * budget)}",
             "scores": {"test": {"dice": dice}}}]}))
    got = plot_curves.points([tmp_path / "a.json", tmp_path / "b.json"], "test", "dice", {"ldiffusion": 3})
    assert list(got) == ["ldiffusion (nostain)"]
    assert [round(m, 2) for m, _ in got["ldiffusion (nostain)"]] == [9.99, 30.0]
    # per-stage budgets (no --max-minutes): placed at their sum, never scaled; --by-method joins the tags
    (tmp_path / "c.json").write_text(json.dumps({
        "command": "python benchmarks/accuracy.py --tag segimg-2-1.5-6.5",
        "overrides": ["ldiffusion:ae_max_minutes=2", "ldiffusion:diffusion_max_minutes=1.5",
                      "ldiffusion:seg_max_minutes=6.5", "ldiffusion:seg_steps=100000"],
        "results": [{"method": "ldiffusion", "tag": "segimg-2-1.5-6.5", "scores": {"test": {"dice": 0.7}}}]}))
    got = plot_curves.points([tmp_path / "b.json", tmp_path / "c.json"], "test", "dice", {"ldiffusion": 3},
                             by_method=True)
    assert got == {"ldiffusion": [(10.0, 70.0), (30.0, 30.0)]}
    # snapshots are taken in the last stage: they sit after the earlier stages' budgets (10 + 10 + M)
    (tmp_path / "d.json").write_text(json.dumps({
        "overrides": ["ldiffusion:ae_max_minutes=10", "ldiffusion:diffusion_max_minutes=10",
                      "ldiffusion:seg_max_minutes=70"],
        "results": [{"method": "ldiffusion", "tag": "x", "snapshot_minutes": 10,
                     "scores": {"test": {"dice": 0.5}}},
                    {"method": "ldiffusion", "tag": "x", "scores": {"test": {"dice": 0.6}}}]}))
    (tmp_path / "e.json").write_text(json.dumps({"max_minutes": 10, "results": [
        {"method": "ldiffusion", "tag": "y", "snapshot_minutes": 4, "scores": {"test": {"dice": 0.4}}}]}))
    got = plot_curves.points([tmp_path / "d.json", tmp_path / "e.json"], "test", "dice", {"ldiffusion": 3})
    assert got == {"ldiffusion (x)": [(30.0, 50.0), (90.0, 60.0)], "ldiffusion (y)": [(24.0, 40.0)]}


def test_plot_curves_line_tags():
    line_tag = load_script("plot_curves").line_tag
    assert [line_tag(t) for t in ("curve", "curve90", "b6-curve", "nostain-curve-30", "semantic-curve30",
                                  "nostain-segimg-5-5-20", "segimg-s2-2-1.5-6.5", "contour-b3-scale0.5")] == \
        ["", "", "b6", "nostain", "semantic", "nostain-segimg", "segimg-s2", "contour-b3-scale0.5"]


def test_choose_min_object_picks_the_smallest_size_near_the_best():
    mod = load_script("choose_min_object")
    assert mod.choose({10: 0.2, 500: 0.41, 1000: 0.415, 4000: 0.424}, 0.01) == 1000
    assert mod.choose({10: 0.2, 500: 0.41}, 0.0) == 500
    # a grid of (size, marker_threshold, marker_erosion_px): the least change within the tolerance
    grid = {(500, None, 0): 0.60, (500, 0.85, 8): 0.695, (1000, None, 0): 0.69, (2000, 0.85, 8): 0.70}
    assert mod.choose(grid, 0.01) == (500, 0.85, 8)
    assert mod.choose({(500, 0.85, 0): 0.7, (500, None, 4): 0.7, (500, 0.7, 0): 0.7}, 0.0) == (500, 0.7, 0)
    flags = "--predict-set min_object_px=500 --predict-set marker_erosion_px=4"
    assert mod.predict_set_flags((500, None, 4)) == flags
    truth = np.zeros((40, 40), np.int64)
    truth[5:25, 5:25] = 1
    pred = truth.copy()
    pred[30:32, 30:32] = 2  # a 4 px fragment
    assert mod.score("obj_f1", truth, pred) < 1.0 and mod.score("obj_f1", truth, truth) == 1.0


def test_object_errors_names_the_cause_of_each_unmatched_true_object(tmp_path):
    errors = load_script("object_errors")
    truth = np.zeros((20, 40), np.int32)
    truth[2:8, 2:8] = 1  # matched exactly
    truth[2:8, 12:18] = 2
    truth[2:8, 19:25] = 3  # 2 and 3 merged into one prediction
    truth[10:18, 2:18] = 4  # split in two halves
    truth[10:18, 25:35] = 5  # missed
    pred = np.zeros_like(truth)
    pred[2:8, 2:8] = 1
    pred[2:8, 12:25] = 2
    pred[10:18, 2:10] = 3
    pred[10:18, 10:18] = 4
    counts = errors.truth_errors(truth, pred)
    assert counts == {"matched": 1, "merged": 2, "split": 1, "missed": 1, "shape": 0}
    grades = tmp_path / "Grade.csv"
    grades.write_text("name,patient ID, grade (GlaS)\ntrain_1,1, benign\ntrain_2,1, malignant\n")
    assert errors.read_grades(grades) == {"train_1": "benign", "train_2": "malignant"}


def test_plot_curves_crops_axis(tmp_path):
    """--x crops: a row's own crops, else steps x its batch size, else steps x --batch-size; others named."""
    plot_curves = load_script("plot_curves")
    import json

    (tmp_path / "new.json").write_text(json.dumps({"max_minutes": 90, "results": [
        {"method": "unet", "tag": "curve90", "steps": 100, "batch_size": 8, "crops": 800,
         "scores": {"test": {"dice": 0.5}}},
        {"method": "unet", "tag": "curve90", "snapshot_minutes": 10, "steps": 25, "batch_size": 8,
         "scores": {"test": {"dice": 0.3}}}]}))
    (tmp_path / "old.json").write_text(json.dumps({"max_minutes": 90, "results": [
        {"method": "cdal", "tag": "curve90", "scores": {"test": {"dice": 0.4}}},
        {"method": "cdal", "tag": "curve90", "snapshot_minutes": 30, "steps": 300,
         "scores": {"test": {"dice": 0.35}}}]}))
    files = [tmp_path / "new.json", tmp_path / "old.json"]
    skipped: list[str] = []
    got = plot_curves.points(files, "test", "dice", x="crops", batch_sizes={"cdal": 4}, skipped=skipped)
    assert got == {"cdal": [(1.2, 35.0)], "unet": [(0.2, 30.0), (0.8, 50.0)]}
    assert skipped == ["old.json: cdal at 90 min"]
    # without the batch size the old snapshot row is left out as well; minutes are unchanged by the option
    skipped = []
    assert plot_curves.points(files, "test", "dice", x="crops", skipped=skipped) == {
        "unet": [(0.2, 30.0), (0.8, 50.0)]}
    assert len(skipped) == 2
    assert plot_curves.points(files, "test", "dice")["cdal"] == [(30.0, 35.0), (90.0, 40.0)]
    # a run's own --set batch_size wins over the preset's given with --batch-size
    (tmp_path / "b8.json").write_text(json.dumps({"overrides": ["cdal:batch_size=8", "cdal:steps=9"],
                                                  "results": [
        {"method": "cdal", "tag": "b8-curve90", "snapshot_minutes": 30, "steps": 300,
         "scores": {"test": {"dice": 0.3}}}]}))
    got = plot_curves.points([tmp_path / "b8.json"], "test", "dice", x="crops", batch_sizes={"cdal": 4})
    assert got == {"cdal (b8)": [(2.4, 30.0)]}
    # --x steps: the row's steps, whatever the batch size
    got = plot_curves.points([*files, tmp_path / "b8.json"], "test", "dice", x="steps")
    assert got == {"cdal": [(0.3, 35.0)], "cdal (b8)": [(0.3, 30.0)], "unet": [(0.025, 30.0), (0.1, 50.0)]}


def test_step_times_reads_the_validation_cost(tmp_path):
    """Steps every 2 s, a validation after step 2 that adds 10 s: median 2 s, one check of 10 s."""
    import json

    step_times = load_script("step_times")
    recs = [{"type": "step", "stage_index": 0, "step": 5, "elapsed_s": 100.0}]  # an earlier stage's step
    recs += [{"type": "step", "stage_index": 1, "step": s, "elapsed_s": t}
             for s, t in ((1, 2.0), (2, 4.0), (3, 16.0), (4, 18.0), (5, 20.0))]
    recs.insert(3, {"type": "val", "stage_index": 1, "step": 2, "val_dice": 0.5})
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\nnot json\n")
    got = step_times.step_times(tmp_path)
    assert got["steps"] == 5 and got["median_step_s"] == 2.0 and got["val_checks"] == 1
    assert got["val_s"] == 10.0 and got["val_share"] == 0.5
    assert step_times.main([str(tmp_path / "missing")]) == 2
