"""Deterministic, grouped data splits (nnU-Net style: made once, stored in `dataset.json`).

Every split is grouped: a group (patient, slide, release image) lies wholly on one side, so no
group leaks between train, validation and test. Without `groups`, every id is its own group.
Draws come from `np.random.default_rng(seed)` over the *sorted* group names, so the result
depends only on the set of ids, the groups and the seed, never on the input order.

An official test set is kept as it is: converters pass it through untouched and only split the
official training set into train and validation with `split_groups`.

Example:
    >>> train, val = split_groups(["a1", "a2", "b1", "c1"], {"a1": "a", "a2": "a", "b1": "b", "c1": "c"},
    ...                           n_val_groups=1, seed=0)
    >>> sorted(train + val)
    ['a1', 'a2', 'b1', 'c1']
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from ldiffusion.core.errors import ConfigError, DatasetFormatError

logger = logging.getLogger(__name__)

__all__ = ["check_disjoint", "make_splits", "split_groups", "split_train_val_test"]


def _group_of(i: str, groups: Mapping[str, str] | None) -> str:
    return i if groups is None else str(groups[i])


def _group_index(ids: Sequence[str], groups: Mapping[str, str] | None) -> dict[str, list[str]]:
    """Return sorted group name -> ids (in input order); raise when an id has no group."""
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if list(ids).count(i) > 1})[:5]
        raise ConfigError(f"split: ids must be unique, got duplicates {dup}")
    out: dict[str, list[str]] = {}
    for i in ids:
        if groups is not None and i not in groups:
            raise ConfigError(f"split: id {i!r} has no entry in groups; give every id a group")
        out.setdefault(_group_of(i, groups), []).append(i)
    return dict(sorted(out.items()))


def _n_take(order: list[str], sizes: dict[str, int], amount: int | float, n_total: int,
            keep: int, what: str) -> int:
    """Number of leading groups of `order` to take for `amount`.

    Args:
        order: shuffled group names still available.
        sizes: ids per group.
        amount: an int is a number of groups; a float in [0, 1) is the share of `n_total` ids to take
            (the prefix whose id count is closest to the target, at least one group when > 0).
        n_total: number of ids the share refers to.
        keep: number of groups that must remain afterwards.
        what: name used in error messages ("val", "test").
    """
    avail = len(order) - keep
    if isinstance(amount, bool) or not isinstance(amount, (int, float, np.integer, np.floating)):
        raise ConfigError(f"split: {what}={amount!r} should be a number of groups (int) "
                          "or a fraction (float)")
    if isinstance(amount, (int, np.integer)):
        n = int(amount)
        if n < 0 or n > avail:
            raise ConfigError(f"split: {what}={n} groups requested but only {avail} can be taken "
                              f"({len(order)} groups, {keep} must remain)")
        return n
    frac = float(amount)
    if not 0.0 <= frac < 1.0:
        raise ConfigError(f"split: {what}={frac!r} is out of range; expected a fraction in [0, 1)")
    if frac == 0.0:
        return 0
    if avail < 1:
        raise ConfigError(f"split: {what}={frac} needs at least {keep + 1} groups, got {len(order)}")
    target = frac * n_total
    cum = np.cumsum([sizes[g] for g in order[:avail]])
    k = int(np.argmin(np.abs(cum - target))) + 1  # closest prefix, at least one group
    return k


def split_groups(ids: Sequence[str], groups: Mapping[str, str] | None = None, *,
                 n_val_groups: int | None = None, fraction: float | None = None,
                 seed: int = 0) -> tuple[list[str], list[str]]:
    """Split `ids` into (train, val) so that no group is on both sides.

    Args:
        ids: case ids (unique) of the official training set.
        groups: id -> group (patient, slide, source image); None makes every id its own group.
        n_val_groups: number of whole groups put in validation.
        fraction: alternatively, the share of *ids* (not groups) wanted in validation; whole groups
            are taken in shuffled order and the prefix closest to the target is kept (at least one).
        seed: seed of `np.random.default_rng`.

    Returns:
        (train ids, val ids), each in the order of `ids`.

    Raises:
        ConfigError: both or neither of `n_val_groups` / `fraction` given, duplicates, an id without a
            group, or more validation groups than available (one group always stays in train).
    """
    if (n_val_groups is None) == (fraction is None):
        raise ConfigError("split_groups: give exactly one of n_val_groups (int) or fraction (float)")
    amount: int | float = int(n_val_groups) if n_val_groups is not None else float(fraction)  # type: ignore[arg-type]
    index = _group_index(ids, groups)
    names = list(index)
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    sizes = {g: len(v) for g, v in index.items()}
    k = _n_take(order, sizes, amount, len(ids), keep=1 if names else 0, what="val")
    val_groups = set(order[:k])
    train = [i for i in ids if _group_of(i, groups) not in val_groups]
    val = [i for i in ids if _group_of(i, groups) in val_groups]
    logger.debug("split_groups: %d groups -> %d val groups (%d ids), seed %d", len(names), k, len(val), seed)
    return train, val


def split_train_val_test(ids: Sequence[str], groups: Mapping[str, str] | None = None, *,
                         val: int | float = 0.15, test: int | float = 0.15,
                         seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    """Split a data set without an official test set into (train, val, test), grouped.

    Groups are shuffled once with `np.random.default_rng(seed)`; test takes the first groups, val the
    next ones, train the rest (at least one group). An int means a number of groups, a float the
    share of all ids (closest whole-group prefix). With `groups=None` and ints, the sizes are exact
    image counts (e.g. ADP 30/10/10 is `val=10, test=10`).

    Returns:
        (train ids, val ids, test ids), each in the order of `ids`.
    """
    index = _group_index(ids, groups)
    names = list(index)
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    sizes = {g: len(v) for g, v in index.items()}
    k_test = _n_take(order, sizes, test, len(ids), keep=1 + (1 if val else 0), what="test")
    rest = order[k_test:]
    k_val = _n_take(rest, sizes, val, len(ids), keep=1, what="val")
    test_g, val_g = set(order[:k_test]), set(rest[:k_val])
    return ([i for i in ids if _group_of(i, groups) not in test_g | val_g],
            [i for i in ids if _group_of(i, groups) in val_g],
            [i for i in ids if _group_of(i, groups) in test_g])


def make_splits(train: Sequence[str], val: Sequence[str], test: Sequence[str]) -> dict[str, list[str]]:
    """Return the `splits` mapping of `dataset.json`, raising when an id is in two splits.

    An empty val or test split is left out (the data set checker reports empty splits).
    """
    splits = {"train": list(train), "val": list(val), "test": list(test)}
    splits = {k: v for k, v in splits.items() if v or k == "train"}
    seen: dict[str, str] = {}
    for name, ids in splits.items():
        for i in ids:
            if i in seen:
                raise DatasetFormatError(f"id {i!r} is in both {seen[i]!r} and {name!r} splits")
            seen[i] = name
    return splits


def check_disjoint(splits: Mapping[str, Sequence[str]], groups: Mapping[str, str],
                   names: Sequence[str] | None = None) -> None:
    """Raise `DatasetFormatError` when a group has ids in more than one of the splits `names`.

    Args:
        splits: split name -> ids.
        groups: id -> group; ids missing from it are their own group.
        names: splits to compare (default all).
    """
    owner: dict[str, str] = {}
    for name in names if names is not None else list(splits):
        for i in splits.get(name, []):
            g = groups.get(i, i)
            if owner.setdefault(g, name) != name:
                raise DatasetFormatError(f"group {g!r} has ids in both {owner[g]!r} and {name!r} "
                                         f"(e.g. {i!r}); a group must stay in one split")
