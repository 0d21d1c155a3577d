"""The data every part of ``hpo bench`` reads: Fashion-MNIST's IDX files when they are found, else
synthetic 28x28 images of 10 classes, written as IDX files so that the seeds' torchvision loop, the
hpo trainer and the workers all read the same thing the same way."""

from __future__ import annotations

import gzip
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpo.data.images import PARTS, find_idx_files
from hpo.errors import DataError

SYNTHETIC_SIZES = {"full": (60000, 10000), "quick": (6000, 2000)}  # (train, test) images


@dataclass(frozen=True)
class BenchData:
    root: Path  # a torchvision root: root/FashionMNIST/raw holds the four uncompressed IDX files
    synthetic: bool
    source: str  # where the files came from, in words

    @property
    def folder(self) -> Path:
        return self.root / "FashionMNIST" / "raw"


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def synthetic_images(n: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 28x28 uint8 images of 10 classes and their labels: each class a fixed random blob
    pattern, each image its class's pattern shifted by up to 2 pixels, scaled and noised, so a
    LeNet-5 learns them to high but not perfect accuracy within a few epochs."""
    rng = np.random.default_rng(seed)
    templates = np.random.default_rng(12345).random((10, 7, 7))
    templates = np.kron(templates, np.ones((4, 4)))  # 28x28 blocks
    labels = rng.integers(0, 10, n)
    shifts = rng.integers(-2, 3, (n, 2))
    images = np.empty((n, 28, 28), dtype=np.float32)
    for i in range(n):
        images[i] = np.roll(templates[labels[i]], tuple(shifts[i]), axis=(0, 1))
    images = images * rng.uniform(0.6, 1.0, (n, 1, 1)) + rng.normal(0, 0.35, images.shape)
    return (np.clip(images, 0, 1) * 255).astype(np.uint8), labels.astype(np.uint8)


def prepare(scratch: Path, *, data_dir: str | None, quick: bool) -> BenchData:
    """Copy (uncompressed) the Fashion-MNIST IDX files into ``scratch`` as a torchvision root, or
    write synthetic ones there when the data set is not found (never downloads).

    Args:
        data_dir: the user's ``--data-dir`` (searched alone), else hpo's usual places.
    """
    raw = scratch / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    try:
        files = find_idx_files("fashion_mnist", data_dir=data_dir, download=False)
    except DataError:
        n_train, n_test = SYNTHETIC_SIZES["quick" if quick else "full"]
        for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
            images, labels = synthetic_images(n, seed=seed)
            _write_idx(raw / PARTS[f"{split}_images"], images)
            _write_idx(raw / PARTS[f"{split}_labels"], labels)
        where = data_dir or "hpo's usual places (see README: image studies)"
        return BenchData(scratch, True, f"SYNTHETIC 28x28 images of 10 classes ({n_train} train, {n_test} test): "
                                        f"the Fashion-MNIST IDX files are not in {where}; accuracies are not Fashion-MNIST's")
    for path in files.values():
        target = raw / path.name.removesuffix(".gz")
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            shutil.copyfile(path, target)
    return BenchData(scratch, False, f"Fashion-MNIST from {files['train_images'].parent}")
