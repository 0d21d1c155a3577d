"""Every split of the data, as index arrays with the seed passed explicitly (in the manner of
scikit-learn's ``model_selection``, which does the splitting): the train/validation split of a
study, the K folds of a retrain and the K folds of a cross-validated trial."""

from __future__ import annotations

import hashlib

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


def kfold_indices(pool: np.ndarray, *, folds: int, seed: int, labels: np.ndarray | None = None,
                  field: str = "--folds") -> list[tuple[np.ndarray, np.ndarray]]:
    """K seeded folds of ``pool`` (row indices into the data set): each fold's ``(train, val)``
    rows, sorted. Stratified by ``labels`` (the class of every row of the data set) when given;
    the folds are :func:`split_folds` of ``len(pool)`` mapped back to the pool's rows.

    Raises:
        HpoError: when there are too few rows (or rows of some class) for K folds; the message
            names ``field``.
    """
    pool = np.asarray(pool)
    pool_labels = labels[pool] if labels is not None else None
    return [(np.sort(pool[tr]), np.sort(pool[va]))
            for tr, va in split_folds(len(pool), folds=folds, seed=seed, labels=pool_labels, flag=field)]


def splitter_name(task: str) -> str:
    """The scikit-learn splitter the folds of a ``task`` use: ``StratifiedKFold`` for classification."""
    return "StratifiedKFold" if task == "classification" else "KFold"


def folds_digest(splits: list[tuple[np.ndarray, np.ndarray]]) -> str:
    """sha256 of the folds' validation rows: two runs with the same digest used the same folds."""
    h = hashlib.sha256()
    for _, val in splits:
        h.update(np.asarray(val, dtype=np.int64).tobytes() + b"|")
    return h.hexdigest()
