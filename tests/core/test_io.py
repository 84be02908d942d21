"""`core.io`: run-folder round trip and atomic writes that survive interruption."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldiffusion.core.errors import CheckpointError
from ldiffusion.core.io import (
    atomic_write,
    atomic_write_bytes,
    load_weights,
    read_json,
    save_torch,
    save_weights,
    write_json,
)


def test_run_folder_round_trip(tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = {"method": "unet", "config": {"lr": 0.001, "sizes": [1, 2]}, "seed": 0}
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    write_json(run / "config.json", config)
    save_weights(run / "model.safetensors", net.state_dict())
    assert read_json(run / "config.json") == config
    loaded = load_weights(run / "model.safetensors")
    assert loaded.keys() == net.state_dict().keys()
    for k, v in net.state_dict().items():
        assert torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype
    net2 = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    net2.load_state_dict(loaded)
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    net.eval(), net2.eval()
    assert torch.equal(net(x), net2(x))


def test_save_torch(tmp_path: Path) -> None:
    save_torch(tmp_path / "s.pt", {"step": 3, "t": torch.arange(3)})
    back = torch.load(tmp_path / "s.pt")
    assert back["step"] == 3 and torch.equal(back["t"], torch.arange(3))


def test_interrupted_atomic_write_keeps_previous_content(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    atomic_write_bytes(path, b"old content")
    with pytest.raises(RuntimeError, match="boom"), atomic_write(path) as f:
        f.write(b"partial new by")
        raise RuntimeError("boom")
    assert path.read_bytes() == b"old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no temp files left


def test_atomic_write_text_and_new_folder(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b.txt"
    with atomic_write(path, "w") as f:
        f.write("hello")
    assert path.read_text() == "hello"


def test_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"missing\.safetensors: weights file not found"):
        load_weights(tmp_path / "missing.safetensors")
    (tmp_path / "x.json").write_text("{bad")
    with pytest.raises(ValueError, match=r"x\.json: not valid JSON"):
        read_json(tmp_path / "x.json")
