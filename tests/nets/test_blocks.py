"""Tests for ldiffusion.nets.blocks: closed forms for the embedding, group counts, block shapes."""

from __future__ import annotations

import math

import pytest
import torch

from ldiffusion.core.errors import InputError
from ldiffusion.nets.blocks import (
    Downsample,
    ResBlock,
    SelfAttention2d,
    Upsample,
    check_input_shape,
    group_norm,
    num_groups,
    timestep_embedding,
)


def test_timestep_embedding_closed_form():
    # t (2,) -> (2, 6): [cos(t f_k) || sin(t f_k)], f_k = 10000^(-k/3)
    t = torch.tensor([0, 7])
    emb = timestep_embedding(t, 6)
    assert emb.shape == (2, 6) and emb.dtype == torch.float32
    assert torch.equal(emb[0], torch.tensor([1.0, 1, 1, 0, 0, 0]))
    freqs = [10000 ** (-k / 3) for k in range(3)]
    expected = [math.cos(7 * f) for f in freqs] + [math.sin(7 * f) for f in freqs]
    torch.testing.assert_close(emb[1], torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_timestep_embedding_odd_dim_and_float_t():
    emb = timestep_embedding(torch.tensor([0.5, 0.25], dtype=torch.float64), 5)
    assert emb.shape == (2, 5) and emb.dtype == torch.float64
    assert torch.all(emb[:, -1] == 0)


def test_timestep_embedding_rejects_bad_shape():
    with pytest.raises(InputError, match=r"\(B,\)"):
        timestep_embedding(torch.zeros(2, 1), 8)


@pytest.mark.parametrize(
    ("channels", "groups"), [(1, 1), (4, 1), (8, 2), (12, 3), (16, 4), (64, 16), (320, 32), (36, 9)]
)
def test_num_groups(channels, groups):
    assert num_groups(channels) == groups
    assert channels % group_norm(channels).num_groups == 0


def test_blocks_shapes():
    x = torch.randn(2, 8, 16, 16)
    temb = torch.randn(2, 32)
    assert ResBlock(8, 16, 32)(x, temb).shape == (2, 16, 16, 16)
    assert ResBlock(8, 8)(x).shape == (2, 8, 16, 16)
    assert SelfAttention2d(8, heads=2)(x).shape == x.shape
    assert Downsample(8)(x).shape == (2, 8, 8, 8)
    assert Upsample(8, 4)(x).shape == (2, 4, 32, 32)


def test_zero_init_blocks_start_as_identity():
    x = torch.randn(2, 8, 8, 8)
    torch.testing.assert_close(ResBlock(8, 8, 16)(x, torch.randn(2, 16)), x)
    torch.testing.assert_close(SelfAttention2d(8, heads=4)(x), x)


def test_attention_matches_manual_softmax():
    torch.manual_seed(0)
    attn = SelfAttention2d(4, heads=1)
    torch.nn.init.normal_(attn.proj.weight)
    x = torch.randn(1, 4, 3, 3)
    q, k, v = attn.qkv(attn.norm(x)).reshape(1, 3, 4, 9).unbind(1)  # each (1, 4, 9)
    w = torch.softmax(q.transpose(1, 2) @ k / 2.0, dim=-1)  # (1, 9, 9), scale 1/sqrt(4)
    out = (v @ w.transpose(1, 2)).reshape(1, 4, 3, 3)
    torch.testing.assert_close(attn(x), x + attn.proj(out), rtol=1e-5, atol=1e-5)


def test_resblock_needs_temb():
    with pytest.raises(InputError, match="temb"):
        ResBlock(4, 4, 8)(torch.zeros(1, 4, 4, 4))


def test_check_input_shape_message():
    with pytest.raises(InputError, match=r"divisible by 8, got \(1, 3, 60, 70\); pad to \(64, 72\)"):
        check_input_shape(torch.zeros(1, 3, 60, 70), 8, "Net")
    with pytest.raises(InputError, match="expected x with 4 channels"):
        check_input_shape(torch.zeros(1, 3, 8, 8), 8, "Net", channels=4)
