import numpy as np

from hpo.data import split_indices


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
