"""Data-parallel `fit` under torchrun: 2 CPU processes (gloo) on the synthetic data set.

The worker script (written to tmp_path) builds the tiny U-Net with a *different* initial seed on
each rank, trains a few steps with `fit`, all-gathers the parameters after every step (from the
step callback) and at the end, and the training sample indices each rank read. The test checks
that the ranks are identical after every step (not only after the end-of-stage broadcast), that
each step's global batch of the seeded order was split between the ranks without overlap, and
that only rank 0 wrote the run folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

WORKER = textwrap.dedent('''
    import json, sys
    from pathlib import Path

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from ldiffusion.data.dataset import SegmentationDataset
    from ldiffusion.data.format import read_dataset_info
    from ldiffusion.data.transforms import TrainTransform
    from ldiffusion.methods import create_method
    from ldiffusion.train.distributed import destroy_distributed, exit_process, init_distributed
    from ldiffusion.train.loop import fit


    class Recording(torch.utils.data.Dataset):
        """Forward to a SegmentationDataset and record the indices read."""

        def __init__(self, ds):
            self.ds, self.seen = ds, []
            self.ids, self.annotated_ids = ds.ids, ds.annotated_ids

        def __len__(self):
            return len(self.ds)

        def __getitem__(self, i):
            self.seen.append(int(i))
            return self.ds[i]

        def set_epoch(self, e):
            self.ds.set_epoch(e)


    data, out, report = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    w = init_distributed(torch.device("cpu"))
    info = read_dataset_info(data)
    # a different initial seed per rank: fit must broadcast rank 0's weights first
    method = create_method("unet", preset="tiny", num_classes=info.num_classes,
                           overrides=["steps=5", "val_every=2", "ckpt_every=3", f"seed={w.rank}"])
    train = Recording(SegmentationDataset(data, "train", transform=TrainTransform(crop_px=32), seed=0))
    val = SegmentationDataset(data, "val")
    steps, step_diffs = [], []


    def max_rank_diff():
        flat = torch.cat([t.detach().float().flatten() for t in method.state_dict().values()])
        gathered = [torch.zeros_like(flat) for _ in range(w.size)]
        dist.all_gather(gathered, flat)
        return max(float((g - gathered[0]).abs().max()) for g in gathered)


    def on_step(rec):  # called on every rank after each optimiser step
        steps.append(rec["losses"]["model"])
        step_diffs.append(max_rank_diff())


    res = fit(method, train, val, out, device="cpu", generator_seed=0, progress=False, callback=on_step)
    n_train_reads = 5 * 2  # 5 steps, global batch 4 split 2 + 2
    final_diff = max_rank_diff()
    seen = [None] * w.size
    dist.all_gather_object(seen, train.seen[:n_train_reads])
    if w.rank == 0:
        report.write_text(json.dumps({
            "world": w.size,
            "step_diffs": step_diffs, "final_diff": final_diff,
            "seen": seen, "losses": steps, "best_score": res.best_score, "finished": res.finished}))
    destroy_distributed()
    exit_process(0)  # as `ldiffusion train` does: gloo threads can abort the interpreter's shutdown
''')


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def _torchrun(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def test_exit_process_flushes_and_keeps_the_code(tmp_path):
    """exit_process writes what was buffered (stdout, stderr, log handlers) and exits with the code given."""
    log = tmp_path / "run.log"
    code = textwrap.dedent(f'''
        import logging, sys
        from ldiffusion.train.distributed import exit_process
        logging.basicConfig(filename={str(log)!r}, level=logging.INFO)
        logging.getLogger("x").info("logged line")
        sys.stdout.write("out line")
        sys.stderr.write("err line")
        exit_process(3)
        print("not reached")
    ''')
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 3
    assert proc.stdout == "out line" and proc.stderr == "err line"
    assert "logged line" in log.read_text()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_ranks_end_identical_and_shard_the_seeded_order(synth_root, tmp_path):
    from ldiffusion.core.rng import derive_seed, make_generator
    from ldiffusion.data.dataset import SegmentationDataset
    from ldiffusion.train.loop import _annotated_indices, _epoch_batches

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out, report = tmp_path / "run", tmp_path / "report.json"
    proc = _torchrun(str(script), str(synth_root), str(out), str(report), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads(report.read_text())
    assert rep["world"] == 2
    # parameters and buffers bit-identical on both ranks after every step and at the end
    assert rep["step_diffs"] == [0.0] * 5
    assert rep["final_diff"] == 0.0
    assert rep["finished"] and rep["best_score"] is not None
    assert len(rep["losses"]) == 5 and all(v == v for v in rep["losses"])

    # each step's global batch (seeded order of a single process) is split 2 + 2 between the ranks
    ds = SegmentationDataset(synth_root, "train")
    indices = _annotated_indices(ds)
    per_epoch = len(indices) // 4
    expected = []
    for epoch in range(2):
        g = make_generator(derive_seed(0, "main", "epoch", epoch))
        expected += [[indices[j] for j in b] for b in _epoch_batches(len(indices), 4, g)][:per_epoch]
    seen0, seen1 = rep["seen"]
    for k in range(5):
        assert seen0[2 * k:2 * k + 2] + seen1[2 * k:2 * k + 2] == expected[k]

    # only rank 0 wrote the run folder: one metrics record per step, not two
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "step"] == [1, 2, 3, 4, 5]
    assert json.loads((out / "config.resolved.json").read_text())["world_size"] == 2
    assert (out / "model.safetensors").is_file() and (out / "train_state.pt").is_file()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_cli_train_under_torchrun(synth_root, tmp_path):
    exe = Path(sys.executable).with_name("ldiffusion")
    if not exe.is_file():
        pytest.skip("the ldiffusion console script is not installed next to the interpreter")
    out = tmp_path / "run"
    proc = _torchrun(str(exe), "train", "--method", "unet", "--data", str(synth_root), "--out", str(out),
                     "--device", "cpu", "--set", "steps=3", "--set", "crop_px=32", "--set", "val_every=0",
                     "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("trained unet") == 1  # only rank 0 prints the result
    from ldiffusion.methods import load_segmenter

    seg = load_segmenter(out)
    assert seg.name == "unet"
