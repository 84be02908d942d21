"""Issue 17, training side: bad input is refused before the run folder changes; nothing is lost.

Each test fails on the code before the fix: a crafted `train_state.pt` ran code on `--resume`; a
folder with weights but no state was overwritten; a resume on other data or another class count
went on silently or crashed; out-of-range labels crashed mid-run; a corrupt `model.safetensors`
gave a traceback; `--annotated-fraction 1.5` was accepted; an empty validation split trained
without a word; Ctrl-C inside a step lost it; outputs were mode 0600 whatever the umask; and some
`--set` values gave tracebacks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldiffusion.cli import main
from ldiffusion.core.errors import CheckpointError
from ldiffusion.core.io import atomic_write_bytes, load_weights, write_json
from ldiffusion.data.synth import make_synthetic_dataset
from ldiffusion.train.state import load_state

FAST = ["--set", "base=4", "--set", "batch_size=2", "--set", "val_every=0", "--no-progress",
        "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("drop_cli_log_handlers")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 synthetic images of 64 px (read-only; copy before changing)."""
    root = tmp_path_factory.mktemp("d") / "synth"
    make_synthetic_dataset(root, n=12, size=64, seed=0)
    return root


@pytest.fixture(scope="module")
def run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step run on `data` (read-only; copy before changing)."""
    out = tmp_path_factory.mktemp("r") / "run"
    assert main(_train(data, out, steps=4)) == 0
    return out


def _train(data: Path, out: Path, *extra: str, steps: int = 4) -> list[str]:
    return ["train", "--method", "unet", "--preset", "tiny", "--data", str(data), "--out", str(out),
            "--set", f"steps={steps}", *FAST, *extra]


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one `error:` line of stderr (and no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------- 1. no unpickling on --resume
class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_resume_never_unpickles_code(run, data, tmp_path, capsys):
    r = _copy(run, tmp_path / "run")
    marker = tmp_path / "pwned"
    torch.save({"version": 2, "payload": _RunsCode(str(marker))}, r / "train_state.pt")
    before = _hashes(r)
    assert main(_train(data, r, "--resume")) == 2
    line = _error_line(capsys)
    assert "train_state.pt" in line and "refusing to unpickle" in line
    assert not marker.exists()
    assert _hashes(r) == before


def test_state_of_the_old_format_is_refused_with_one_line(run, data, tmp_path, capsys):
    r = _copy(run, tmp_path / "run")
    state = torch.load(r / "train_state.pt", weights_only=True)
    state["version"] = 1
    state["rng"]["numpy"] = np.random.get_state()  # noqa: NPY002 - what version 1 stored: an ndarray
    torch.save(state, r / "train_state.pt")
    before = _hashes(r)
    assert main(_train(data, r, "--resume")) == 2
    line = _error_line(capsys)
    assert "train_state.pt" in line and "new run" in line
    assert _hashes(r) == before


def test_new_state_loads_with_weights_only(run):
    d = torch.load(run / "train_state.pt", weights_only=True)
    assert d["version"] == 2 and d["step"] == 0 and d["stage_index"] == 1
    assert d["run"]["num_classes"] == 5 and len(d["run"]["data_fingerprint"]) == 64
    assert load_state(run / "train_state.pt")["method"] == "unet"


@pytest.mark.parametrize("content", [b"", b"\x00garbage" * 3])
def test_unreadable_state_is_one_line(run, data, tmp_path, capsys, content):
    r = _copy(run, tmp_path / "run")
    (r / "train_state.pt").write_bytes(content)
    before = _hashes(r)
    assert main(_train(data, r, "--resume")) == 2
    assert "train_state.pt" in _error_line(capsys)
    assert _hashes(r) == before


# ---------------------------------------------------------------- 2. --out holding a run
def test_out_with_weights_but_no_state_is_refused(run, data, tmp_path, capsys):
    r = _copy(run, tmp_path / "run")
    (r / "train_state.pt").unlink()
    before = _hashes(r)
    assert main(_train(data, r, steps=2)) == 2
    line = _error_line(capsys)
    assert str(r) in line and "model.safetensors" in line and "--overwrite" in line
    assert _hashes(r) == before
    # --overwrite starts over: new log with only this run's 2 steps
    assert main(_train(data, r, "--overwrite", steps=2)) == 0
    steps = [json.loads(x)["step"] for x in (r / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["type"] == "step"]
    assert steps == [1, 2]
    capsys.readouterr()
    assert main(_train(data, r, "--overwrite", "--resume", steps=2)) == 2
    assert "--resume and --overwrite" in _error_line(capsys)


def test_out_that_is_a_file_is_refused(data, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_bytes(b"keep")
    assert main(_train(data, f)) == 2
    assert str(f) in _error_line(capsys)
    assert f.read_bytes() == b"keep"


# ---------------------------------------------------------------- 3. resume on other data / classes
def test_resume_with_other_images_same_classes_is_refused(run, data, tmp_path, capsys):
    other = tmp_path / "other"
    make_synthetic_dataset(other, n=12, size=64, seed=1)  # same ids and class names, other pixels
    assert json.loads((other / "dataset.json").read_text())["classes"] == \
        json.loads((data / "dataset.json").read_text())["classes"]
    r = _copy(run, tmp_path / "run")
    before = _hashes(r)
    assert main(_train(other, r, "--resume")) == 2
    line = _error_line(capsys)
    assert "train_state.pt" in line and "data set differs" in line
    assert _hashes(r) == before
    # moving the same data set elsewhere is fine
    moved = _copy(data, tmp_path / "moved")
    assert main(_train(moved, r, "--resume")) == 0


def test_resume_with_another_class_count_is_refused(run, data, tmp_path, capsys):
    more = _copy(data, tmp_path / "more")
    info = json.loads((more / "dataset.json").read_text())
    info["classes"].append({"id": 5, "name": "extra", "color": [1, 2, 3]})
    (more / "dataset.json").write_text(json.dumps(info))
    r = _copy(run, tmp_path / "run")
    before = _hashes(r)
    assert main(_train(more, r, "--resume")) == 2
    line = _error_line(capsys)
    assert "5 classes" in line and "6" in line
    assert _hashes(r) == before


# ---------------------------------------------------------------- 4. labels out of range
def test_out_of_range_label_is_refused_before_training(data, tmp_path, capsys):
    bad = _copy(data, tmp_path / "bad")
    info = json.loads((bad / "dataset.json").read_text())
    case = info["splits"]["val"][0]
    lab = bad / "labels" / f"{case}.png"
    arr = np.array(Image.open(lab))
    arr[0, 0] = 7  # 5 classes, ignore 255
    Image.fromarray(arr).save(lab)
    out = tmp_path / "run"
    assert main(_train(bad, out)) == 2
    line = _error_line(capsys)
    assert str(lab) in line and "7" in line
    assert not out.exists()


# ---------------------------------------------------------------- 5. corrupt model.safetensors
@pytest.mark.parametrize("kind", ["empty", "garbage", "truncated"])
def test_corrupt_weights_are_one_line(run, data, tmp_path, capsys, kind):
    r = _copy(run, tmp_path / "run")
    w = r / "model.safetensors"
    content = {"empty": b"", "garbage": b"not a safetensors file at all",
               "truncated": w.read_bytes()[: w.stat().st_size // 2]}[kind]
    w.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_weights(w)
    img = next(iter(sorted((data / "images").iterdir())))
    out = tmp_path / "pred"
    assert main(["predict", str(r), str(img), "--out", str(out), "--no-progress"]) == 2
    assert str(w) in _error_line(capsys)
    assert not any(out.glob("*.png"))


# ---------------------------------------------------------------- 6. fraction, missing validation
@pytest.mark.parametrize("fraction", ["1.5", "0", "-0.5", "nan"])
def test_annotated_fraction_out_of_range(data, tmp_path, capsys, fraction):
    out = tmp_path / "run"
    assert main(_train(data, out, "--annotated-fraction", fraction)) == 2
    assert "--annotated-fraction" in _error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("how", ["empty", "missing"])
def test_no_validation_split_warns(data, tmp_path, capsys, how):
    d = _copy(data, tmp_path / "d")
    info = json.loads((d / "dataset.json").read_text())
    if how == "empty":
        info["splits"]["val"] = []
    else:
        del info["splits"]["val"]
    (d / "dataset.json").write_text(json.dumps(info))
    assert main(_train(d, tmp_path / "run", steps=2)) == 0
    err = capsys.readouterr().err
    assert f"split 'val' is {how}" in err and "last step" in err


# ---------------------------------------------------------------- 7. Ctrl-C / SIGTERM keep the last step
def test_signal_inside_a_step_saves_that_step(data, tmp_path):
    """A SIGINT delivered in the middle of step 3 (ckpt_every=2): the state holds step 3, not 2."""
    from ldiffusion.data.dataset import SegmentationDataset
    from ldiffusion.data.transforms import TrainTransform
    from ldiffusion.methods import create_method
    from ldiffusion.train.loop import fit

    ovr = ["steps=6", "ckpt_every=2", "val_every=0", "batch_size=2", "base=4"]
    train = SegmentationDataset(data, "train", transform=TrainTransform(crop_px=32), seed=0)
    full = create_method("unet", preset="tiny", num_classes=5, overrides=ovr)
    fit(full, train, None, tmp_path / "full", progress=False)

    m = create_method("unet", preset="tiny", num_classes=5, overrides=ovr)
    step_fn, calls = m.training_step, []

    def step_with_signal(batch, generator, stage):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs here, inside the step
        return step_fn(batch, generator, stage)

    m.training_step = step_with_signal
    # a test runner started as a background job inherits SIGINT ignored, and fit keeps an ignored
    # signal ignored on purpose: give this process Python's default Ctrl-C handler for the test
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            fit(m, train, None, tmp_path / "run", progress=False)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    finally:
        signal.signal(signal.SIGINT, previous)
    assert load_state(tmp_path / "run" / "train_state.pt")["step"] == 3
    resumed = create_method("unet", preset="tiny", num_classes=5, overrides=ovr)
    r = fit(resumed, train, None, tmp_path / "run", progress=False, resume=True)
    assert r.steps_run == 3
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in full.state_dict().items())


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from ldiffusion.cli import main; sys.exit(main())", *args]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_real_signal_to_the_command_then_resume_continues_exactly(data, tmp_path, sig):
    steps = 60
    args = _train(data, tmp_path / "run", "--set", "ckpt_every=1000", steps=steps)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # SIG_DFL in the child even when this runner was started with SIGINT ignored (a background job)
    proc = subprocess.Popen(_cli(*args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    log = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and log.read_text().count('"type": "step"') >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before the signal"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    saved = load_state(tmp_path / "run" / "train_state.pt")["step"]
    logged = [json.loads(x)["step"] for x in log.read_text().splitlines() if '"type": "step"' in x]
    assert 3 <= saved < steps and logged[-1] == saved  # the last finished step is the saved one
    assert f"step {saved} saved" in err

    assert main([*args, "--resume"]) == 0
    logged = [json.loads(x)["step"] for x in log.read_text().splitlines() if '"type": "step"' in x]
    assert logged == list(range(1, steps + 1))
    assert main(_train(data, tmp_path / "full", "--set", "ckpt_every=1000", steps=steps)) == 0
    a = load_weights(tmp_path / "run" / "model.safetensors")
    b = load_weights(tmp_path / "full" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- 8. permissions follow the umask
@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        write_json(tmp_path / "b.json", {"a": 1})
    finally:
        os.umask(old)
    for f in ("a.bin", "b.json"):
        assert (tmp_path / f).stat().st_mode & 0o777 == mode


def test_run_folder_files_are_0644_under_umask_022(run, data, tmp_path):
    old = os.umask(0o022)
    try:
        assert main(_train(data, tmp_path / "run", steps=2)) == 0
    finally:
        os.umask(old)
    for f in ("config.json", "model.safetensors", "train_state.pt", "config.resolved.json", "metrics.jsonl"):
        assert (tmp_path / "run" / f).stat().st_mode & 0o777 == 0o644, f


# ---------------------------------------------------------------- 9. --set values found by fuzzing
@pytest.mark.parametrize(("override", "named"), [
    ("seed=99999999999999999999", "seed="),
    ("crop_px=1", "crop_px=1"),
    ("crop_px=63", "crop_px=63"),
])
def test_bad_overrides_are_one_line_before_writing(data, tmp_path, capsys, override, named):
    out = tmp_path / "run"
    assert main(_train(data, out, "--set", override)) == 2
    assert named in _error_line(capsys)
    assert not out.exists()

