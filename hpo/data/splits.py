"""K-fold splits of a training pool: seeded index arrays (scikit-learn's KFold, StratifiedKFold by
class for classification), the same for ``hpo retrain`` and for cross-validated trials."""

from __future__ import annotations

import hashlib

import numpy as np

from hpo.errors import HpoError


def kfold_indices(pool: np.ndarray, *, folds: int, seed: int, labels: np.ndarray | None = None,
                  field: str = "--folds") -> list[tuple[np.ndarray, np.ndarray]]:
    """K seeded folds of ``pool`` (row indices into the data set): each fold's ``(train, val)``
    rows, sorted. Stratified by ``labels`` (the class of every row of the data set) when given.

    Raises:
        HpoError: when there are too few rows (or rows of some class) for K folds; the message
            names ``field``.
    """
    from sklearn.model_selection import KFold, StratifiedKFold

    n = len(pool)
    if folds < 2:
        raise HpoError(f"{field}: need at least 2 folds, got {folds}")
    if folds > n:
        raise HpoError(f"{field}: {folds} folds need at least {folds} samples; the training pool has {n}")
    if labels is not None:
        pool_labels = labels[pool]
        present = np.bincount(pool_labels)
        smallest = int(present[present > 0].min())
        if folds > smallest:
            raise HpoError(f"{field}: {folds} stratified folds need at least {folds} samples of every class; "
                           f"the rarest class has {smallest}")
        splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(pool, pool_labels)
    else:
        splits = KFold(n_splits=folds, shuffle=True, random_state=seed).split(pool)
    return [(np.sort(pool[tr]), np.sort(pool[va])) for tr, va in splits]


def splitter_name(task: str) -> str:
    return "StratifiedKFold" if task == "classification" else "KFold"


def folds_digest(splits: list[tuple[np.ndarray, np.ndarray]]) -> str:
    """sha256 of the folds' validation rows: two runs with the same digest used the same folds."""
    h = hashlib.sha256()
    for _, val in splits:
        h.update(np.asarray(val, dtype=np.int64).tobytes() + b"|")
    return h.hexdigest()
