"""CSV data kept in the store: create-study's read and check, the upload, a worker's first fetch
and its cached read, for one CSV of about --mb megabytes on each store given.

    python benchmarks/bench_data.py --mb 20 sqlite:///tmp/bench.db postgresql://postgres@127.0.0.1/test mysql+pymysql://root@127.0.0.1/test

Each store gets a fresh study named ``bench_data`` (and the content is deleted again afterwards).
Prints seconds per step and the ratio of the first fetch to a cached read, measured in one run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hpo.data.cache import local_copy  # noqa: E402
from hpo.data.tables import embed_csv, read_csv_table, size_text  # noqa: E402
from hpo.search.study import create, delete  # noqa: E402
from hpo.spec.schema import parse_spec  # noqa: E402
from hpo.store import data_tables as datastore
from hpo.store.config import mask_url  # noqa: E402
from hpo.store.storage import open_storage  # noqa: E402


def make_csv(path: Path, mb: float) -> Path:
    rows = int(mb * 1e6 / 38)  # about 38 bytes a row at 6 decimals
    rng = np.random.default_rng(0)
    pd.DataFrame(rng.normal(size=(rows, 4)), columns=["a", "b", "c", "y"]).to_csv(path, index=False, float_format="%.6f")
    return path


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("urls", nargs="+")
    parser.add_argument("--mb", type=float, default=20.0)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="hpo-bench-data-"))
    os.environ["HPO_CACHE_DIR"] = str(folder / "cache")
    train = make_csv(folder / "train.csv", args.mb)
    test = make_csv(folder / "test.csv", 0.05)
    raw = {"name": "bench_data", "data": {"source": "csv", "train": str(train), "test": str(test),
                                           "features": ["a", "b", "c"], "target": "y"},
           "space": {"lr": {"float": [1e-3, 1e-2]}}}
    print(f"train CSV {size_text(train.stat().st_size)}, chunks of {size_text(datastore.CHUNK_BYTES)}")
    print(f"{'store':60s} {'check s':>8s} {'upload s':>9s} {'fetch s':>8s} {'cached s':>9s} {'parse s':>8s} {'fetch/cached':>13s}")
    for url in args.urls:
        spec, check = timed(lambda: embed_csv(parse_spec(raw)))
        storage = open_storage(url, heartbeat=False)
        _, upload = timed(lambda: create(spec, storage, force=True))
        ref = spec.data.files["train"]
        for p in Path(os.environ["HPO_CACHE_DIR"]).glob("*"):
            p.unlink()
        path, fetch = timed(lambda: local_copy(ref, storage.engine))
        _, cached = timed(lambda: local_copy(ref, storage.engine))
        _, parse = timed(lambda: read_csv_table(str(path), ("a", "b", "c", "y")))
        delete("bench_data", storage)
        print(f"{mask_url(url):60s} {check:8.2f} {upload:9.2f} {fetch:8.2f} {cached:9.2f} {parse:8.2f} {fetch / cached:13.1f}")


if __name__ == "__main__":
    main()
