"""Every split of the data, as index arrays with the seed passed explicitly (in the manner of
scikit-learn's ``model_selection``, which does the splitting): the train/validation split of a
study and the K folds of a retrain."""

from __future__ import annotations

import numpy as np

from hpo.errors import HpoError


def split_indices(n: int, *, val_fraction: float, seed: int, labels: np.ndarray | None = None,
                  train_subset: int | None = None, val_subset: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/validation split of ``range(n)`` (stratified when labels are given), optionally
    cut to subsets of the given sizes (the seeds searched on 10k/5k, then retrained on all)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    try:
        train, val = train_test_split(idx, test_size=val_fraction, random_state=seed, shuffle=True, stratify=labels)
    except ValueError:
        if labels is None:
            raise
        # A class too rare to stratify (a handful of rows): split without stratification.
        train, val = train_test_split(idx, test_size=val_fraction, random_state=seed, shuffle=True)
    if train_subset is not None:
        train = train[:train_subset]
    if val_subset is not None:
        val = val[:val_subset]
    return np.sort(train), np.sort(val)


def split_folds(n: int, *, folds: int, seed: int, labels: np.ndarray | None = None,
                flag: str = "--folds") -> list[tuple[np.ndarray, np.ndarray]]:
    """K seeded folds of ``range(n)``: (train, validation) index arrays, each sorted; stratified by
    class when ``labels`` (one class number per sample) are given (scikit-learn's
    ``StratifiedKFold``, else ``KFold``, both shuffled with ``seed``).

    Raises:
        HpoError: when there are too few samples (or samples of some class) for K folds; the
            message names ``flag``, the option that set K.
    """
    from sklearn.model_selection import KFold, StratifiedKFold

    if folds < 2:
        raise HpoError(f"{flag}: need at least 2 folds, got {folds}")
    if folds > n:
        raise HpoError(f"{flag}: {folds} folds need at least {folds} samples; the training pool has {n}")
    pool = np.arange(n)
    if labels is not None:
        present = np.bincount(labels)
        smallest = int(present[present > 0].min())
        if folds > smallest:
            raise HpoError(f"{flag}: {folds} stratified folds need at least {folds} samples of every class; "
                           f"the rarest class has {smallest}")
        splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(pool, labels)
    else:
        splits = KFold(n_splits=folds, shuffle=True, random_state=seed).split(pool)
    return [(np.sort(tr), np.sort(va)) for tr, va in splits]
