"""A registry source's data (``hpo.data.registry``) kept in the store as one ``.npz`` file, and
turned into the ``Dataset`` every stage takes.

At ``create-study`` the source is read once, its arrays checked and written to one uncompressed
``.npz`` (``x``, ``y``, ``x_test``, ``y_test``, ``classes``; images as uint8) in the local data cache
under its sha256, and the spec refers to it (``data.files.arrays``); the store keeps it like a CSV
(``hpo.store.data_tables``), within ``HPO_MAX_DATA_BYTES``. A worker fetches it once per machine.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from hpo.data.checksum import sha256_file
from hpo.data.csv_lines import FINITE, not_float32
from hpo.data.registry import Arrays
from hpo.errors import DataError
from hpo.spec.schema import StudySpec
from hpo.store.config import max_data_bytes


def check_arrays(a: Arrays, *, task: str, source: str) -> Arrays:
    """``a`` checked (one line naming ``source`` on a problem) and in canonical types.

    Raises:
        DataError: mismatched lengths or sample shapes, images that are not uint8, labels outside
            the classes, fewer than two classes or samples.
    """
    x, y, xt, yt = (np.asarray(v) for v in (a.x, a.y, a.x_test, a.y_test))
    for part, xs, ys in (("train", x, y), ("test", xt, yt)):
        if xs.ndim not in (2, 4):
            raise DataError(f"{source}: {part} x has shape {xs.shape}; expected (N, features) or (N, channels, height, width)")
        if len(xs) != len(ys) or ys.ndim != 1:
            raise DataError(f"{source}: {part} has {len(xs)} samples in x but y of shape {ys.shape}; expected ({len(xs)},)")
    if x.shape[1:] != xt.shape[1:]:
        raise DataError(f"{source}: the training samples have shape {x.shape[1:]} but the test samples {xt.shape[1:]}")
    if len(x) < 2:
        raise DataError(f"{source}: needs at least 2 training samples, has {len(x)}")
    if x.ndim == 4 and (x.dtype != np.uint8 or xt.dtype != np.uint8):
        raise DataError(f"{source}: images must be uint8 pixels, got {x.dtype}/{xt.dtype}")
    # the one rule of every input format (hpo.data.csv_lines): each value finite within float32
    for part, name, values in (("train", "x", x), ("test", "x", xt), ("train", "y", y), ("test", "y", yt)):
        if values.dtype.kind not in "biuf":
            raise DataError(f"{source}: {part} {name} holds {values.dtype} values; allowed: numbers")
        bad = not_float32(values)
        if bad.any():
            where = [int(i) for i in np.argwhere(bad)[0]]
            raise DataError(f"{source}: {part} {name} element {where}: got {values[tuple(where)].item()!r}; "
                            f"allowed: {FINITE}")
    if x.ndim == 2:
        x, xt = x.astype(np.float32), xt.astype(np.float32)
    classes = tuple(str(c) for c in a.classes)
    if task == "classification":
        if not all(np.issubdtype(v.dtype, np.integer) or np.all(v == np.round(v)) for v in (y, yt)):
            raise DataError(f"{source}: y must hold class indices for a classification study")
        y, yt = y.astype(np.int64), yt.astype(np.int64)
        n = len(classes) or int(max(y.max(), yt.max())) + 1
        classes = classes or tuple(str(i) for i in range(n))
        if min(y.min(), yt.min()) < 0 or max(y.max(), yt.max()) >= n:
            raise DataError(f"{source}: y holds class indices outside 0..{n - 1} ({n} classes)")
        if len(np.unique(y)) < 2:
            raise DataError(f"{source}: the training data hold one class only ({classes[int(y[0])]!r}); "
                            "a classification needs at least 2")
    else:
        y, yt, classes = y.astype(np.float32), yt.astype(np.float32), ()
    return Arrays(x, y, xt, yt, classes)


def store_arrays(spec: StudySpec, *, cache: Path) -> StudySpec:
    """Read a registry source's data, check them, write them as one ``.npz`` into ``cache`` under
    its sha256 and refer to it from the spec (``data.files.arrays``). No-op for the legacy sources.

    Raises:
        DataError: the source's refusals; the arrays are over ``HPO_MAX_DATA_BYTES``.
        SpecError: as ``hpo.data.registry.entry``.
    """
    from hpo.data import registry
    from hpo.data.tables import size_text

    d = spec.data
    if d.source in registry.LEGACY:
        return spec
    src = registry.source(d.source)
    arrays = check_arrays(src.read(train=d.train, test=d.test, data_dir=d.data_dir), task=d.task,
                          source=f"data.source {d.source}")
    limit = max_data_bytes()
    total = sum(v.nbytes for v in (arrays.x, arrays.y, arrays.x_test, arrays.y_test))
    if total > limit:
        raise DataError(f"data: {d.source} {d.train or d.data_dir}: {size_text(total)} of arrays, over the store's "
                        f"limit of {size_text(limit)} per study (HPO_MAX_DATA_BYTES={limit}); raise it, or use less data")
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=".arrays.", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, x=arrays.x, y=arrays.y, x_test=arrays.x_test, y_test=arrays.y_test,
                     classes=np.asarray(arrays.classes, dtype=str))
        sha = sha256_file(tmp)
        os.replace(tmp, cache / sha)
    finally:
        Path(tmp).unlink(missing_ok=True)
    ref = {"name": f"{d.source}.npz", "size": (cache / sha).stat().st_size, "rows": len(arrays.x),
           "test_rows": len(arrays.x_test), "shape": list(arrays.x.shape[1:]), "classes": len(arrays.classes),
           "sha256": sha}
    return spec.with_data(replace(d, files={"arrays": ref}))


def read_arrays(path: str | Path) -> Arrays:
    """The arrays of a stored ``.npz`` (see :func:`store_arrays`), read without pickles."""
    with np.load(path, allow_pickle=False) as z:
        return Arrays(z["x"], z["y"], z["x_test"], z["y_test"], tuple(str(c) for c in z["classes"]))
