"""benchmarks/label_oracle.py: the block-majority reduction and its score."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

_SPEC = importlib.util.spec_from_file_location(
    "label_oracle", Path(__file__).resolve().parents[2] / "benchmarks" / "label_oracle.py")
label_oracle = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(label_oracle)


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
