"""Splits as index arrays with an explicit seed: the study's train/validation split and a retrain's K folds."""

import numpy as np
import pytest

from hpo.data.splits import split_folds, split_indices
from hpo.errors import HpoError


def test_split_is_seeded_disjoint_and_stratified():
    labels = np.repeat(np.arange(4), 25)
    train, val = split_indices(100, val_fraction=0.2, seed=3, labels=labels)
    again = split_indices(100, val_fraction=0.2, seed=3, labels=labels)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    assert len(val) == 20 and not set(train) & set(val)
    assert np.bincount(labels[val]).tolist() == [5, 5, 5, 5]


def test_split_with_a_class_too_rare_to_stratify():
    labels = np.array([0] * 9 + [1])  # one row of class 1: stratifying is impossible
    train, val = split_indices(10, val_fraction=0.3, seed=0, labels=labels)
    assert len(train) == 7 and len(val) == 3 and sorted([*train, *val]) == list(range(10))


def test_subsets_cut_the_split():
    train, val = split_indices(1000, val_fraction=0.2, seed=0, train_subset=100, val_subset=50)
    assert len(train) == 100 and len(val) == 50


def test_stratified_folds_keep_class_balance():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 15)
    folds = split_folds(105, folds=5, seed=0, labels=labels)
    for train_idx, val_idx in folds:
        assert np.bincount(labels[val_idx], minlength=3).tolist() == [12, 6, 3]
        assert np.bincount(labels[train_idx], minlength=3).tolist() == [48, 24, 12]
    assert sorted(np.concatenate([v for _, v in folds]).tolist()) == list(range(105))
    assert [v.tolist() for _, v in split_folds(105, folds=5, seed=0, labels=labels)] == [v.tolist() for _, v in folds]
    with pytest.raises(HpoError, match="--folds: 16 stratified folds need at least 16 samples of every class; "
                                       "the rarest class has 15"):
        split_folds(105, folds=16, seed=0, labels=labels)


def test_regression_folds_cover_the_pool_once():
    folds = split_folds(23, folds=4, seed=1)
    assert sorted(np.concatenate([v for _, v in folds]).tolist()) == list(range(23))
    assert all(len(np.intersect1d(t, v)) == 0 and len(t) + len(v) == 23 for t, v in folds)
    assert [v.tolist() for _, v in folds] != [v.tolist() for _, v in split_folds(23, folds=4, seed=2)]  # seeded
    with pytest.raises(HpoError, match="--folds: need at least 2 folds, got 1"):
        split_folds(23, folds=1, seed=0)
    with pytest.raises(HpoError, match="--cv: 24 folds need at least 24 samples"):
        split_folds(23, folds=24, seed=0, flag="--cv")
