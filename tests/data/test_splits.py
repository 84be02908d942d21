"""Deterministic grouped splits."""

from __future__ import annotations

import pytest

from ldiffusion.core.errors import ConfigError, DatasetFormatError
from ldiffusion.data.splits import check_disjoint, make_splits, split_groups, split_train_val_test

IDS = [f"p{g}_{k}" for g in range(6) for k in range(g + 1)]  # groups of size 1..6, 21 ids
GROUPS = {i: i.split("_")[0] for i in IDS}


def test_split_groups_is_grouped_and_complete() -> None:
    train, val = split_groups(IDS, GROUPS, n_val_groups=2, seed=3)
    assert sorted(train + val) == sorted(IDS)
    assert len({GROUPS[i] for i in val}) == 2
    assert not {GROUPS[i] for i in val} & {GROUPS[i] for i in train}
    assert train == [i for i in IDS if i in set(train)]  # input order kept


def test_split_groups_deterministic_and_order_free() -> None:
    a = split_groups(IDS, GROUPS, n_val_groups=2, seed=7)
    b = split_groups(list(reversed(IDS)), GROUPS, n_val_groups=2, seed=7)
    assert set(a[1]) == set(b[1])
    assert split_groups(IDS, GROUPS, n_val_groups=2, seed=7) == a
    vals = {tuple(split_groups(IDS, GROUPS, n_val_groups=2, seed=s)[1]) for s in range(10)}
    assert len(vals) > 1


def test_fraction_targets_ids() -> None:
    ids = [f"x{k}" for k in range(30)]
    train, val = split_groups(ids, fraction=0.2, seed=0)
    assert (len(train), len(val)) == (24, 6)
    _, val = split_groups(IDS, GROUPS, fraction=0.01, seed=0)
    assert len({GROUPS[i] for i in val}) == 1  # at least one group


def test_errors() -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        split_groups(IDS, GROUPS)
    with pytest.raises(ConfigError, match="only 5 can be taken"):
        split_groups(IDS, GROUPS, n_val_groups=6)
    with pytest.raises(ConfigError, match="no entry in groups"):
        split_groups(["a", "b"], {"a": "g"}, n_val_groups=1)
    with pytest.raises(ConfigError, match="duplicates"):
        split_groups(["a", "a", "b"], n_val_groups=1)


def test_three_way_exact_counts() -> None:
    ids = [f"i{k:02d}" for k in range(50)]
    train, val, test = split_train_val_test(ids, val=10, test=10, seed=0)
    assert (len(train), len(val), len(test)) == (30, 10, 10)
    assert not set(train) & set(val) | set(train) & set(test) | set(val) & set(test)
    tr, va, te = split_train_val_test(IDS, GROUPS, val=0.15, test=0.15, seed=1)
    check_disjoint({"train": tr, "val": va, "test": te}, GROUPS)
    assert tr and va and te


def test_make_splits_and_check_disjoint() -> None:
    assert make_splits(["a"], [], ["b"]) == {"train": ["a"], "test": ["b"]}
    with pytest.raises(DatasetFormatError, match="both"):
        make_splits(["a"], ["a"], [])
    with pytest.raises(DatasetFormatError, match="group 'g'"):
        check_disjoint({"train": ["a"], "val": ["b"]}, {"a": "g", "b": "g"})
