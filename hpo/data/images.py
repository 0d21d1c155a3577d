"""Fashion-MNIST and MNIST as tensors, read from their IDX files, and on-device augmentation.

The four IDX files (gzipped or not) are looked for, in order, in: the worker's ``--data-dir``
(only there: a folder the user names must hold them), the spec's ``data.data_dir``, ``$HPO_DATA_DIR``,
``./data`` and ``~/.cache/hpo/data`` (each also as a torchvision root, ``<root>/FashionMNIST/raw``),
Debian's ``/usr/share/datasets/<name>``, and last torchvision's download into ``~/.cache/hpo/data``
when the network allows (probed with a short timeout so an offline worker fails fast).
"""

from __future__ import annotations

import gzip
import math
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hpo.data.dataset import Dataset
from hpo.data.splits import split_indices
from hpo.errors import DataError
from hpo.spec.schema import StudySpec

PARTS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
DOWNLOAD_ROOT = Path("~/.cache/hpo/data").expanduser()
PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class ImageSource:
    title: str
    torchvision: str  # the torchvision class, also its folder name under a root
    debian: str | None  # Debian's package dataset-<name>, installed under /usr/share/datasets/<name>
    mirror: tuple[str, int]  # (host, port) probed before trying a download
    mean: float
    std: float
    classes: tuple[str, ...]


SOURCES = {
    "fashion_mnist": ImageSource(
        "Fashion-MNIST", "FashionMNIST", "fashion-mnist", ("fashion-mnist.s3-website.eu-central-1.amazonaws.com", 80),
        0.2860, 0.3530,
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")),
    "mnist": ImageSource(
        "MNIST", "MNIST", None, ("ossci-datasets.s3.amazonaws.com", 443),
        0.1307, 0.3081, tuple(str(i) for i in range(10))),
}

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path, *, max_bytes: int | None = None) -> np.ndarray:
    """Read one IDX file (``.gz`` or plain) into an array of its stored shape.

    Args:
        max_bytes: refuse a file that holds (once decompressed) more than this many bytes.

    Raises:
        DataError: naming the file when it is not IDX, is cut short or holds more than ``max_bytes``.
    """
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read() if max_bytes is None else f.read(max_bytes + 1)
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read: {e}") from e
    if max_bytes is not None and len(raw) > max_bytes:
        raise DataError(f"{path}: holds more than {max_bytes:,} bytes once decompressed (HPO_MAX_DATA_BYTES)")
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: IDX header cut short")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: holds {len(raw) - header} bytes of data, its header {shape} says {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _files_in(folder: Path) -> dict[str, Path] | None:
    """The four IDX files in ``folder`` (each plain or gzipped), or None unless all are there."""
    found = {}
    for part, stem in PARTS.items():
        for name in (stem, f"{stem}.gz"):
            if (folder / name).is_file():
                found[part] = folder / name
                break
        else:
            return None
    return found


def _folders(root: Path, src: ImageSource) -> list[Path]:
    return [root, root / src.torchvision / "raw"]


def candidate_folders(source: str, *, spec_dir: str | None = None) -> list[Path]:
    """Every folder searched for ``source`` after an explicit ``--data-dir``, in order."""
    src = SOURCES[source]
    roots = [Path(p).expanduser() for p in (spec_dir, os.environ.get("HPO_DATA_DIR")) if p]
    roots += [Path.cwd() / "data", DOWNLOAD_ROOT]
    folders = [f for root in roots for f in _folders(root, src)]
    if src.debian:
        folders.append(Path("/usr/share/datasets") / src.debian)
    return list(dict.fromkeys(folders))


def _network_allows(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def _download(src: ImageSource) -> tuple[dict[str, Path] | None, str]:
    if not _network_allows(src.mirror):
        return None, f"download skipped ({src.mirror[0]} not reachable)"
    import torchvision

    try:
        getattr(torchvision.datasets, src.torchvision)(str(DOWNLOAD_ROOT), train=True, download=True)
        getattr(torchvision.datasets, src.torchvision)(str(DOWNLOAD_ROOT), train=False, download=True)
    except Exception as e:  # torchvision raises plain RuntimeError/URLError on any mirror failure
        return None, f"download into {DOWNLOAD_ROOT} failed ({type(e).__name__}: {e})"
    return _files_in(DOWNLOAD_ROOT / src.torchvision / "raw"), f"download into {DOWNLOAD_ROOT}"


def find_idx_files(source: str, *, data_dir: str | None = None, spec_dir: str | None = None,
                   download: bool = True) -> dict[str, Path]:
    """Locate the four IDX files of ``source`` (``fashion_mnist`` or ``mnist``).

    Args:
        data_dir: a folder the user named on the command line: searched alone (with its
            torchvision layout), so a wrong path is reported rather than silently bypassed.
        spec_dir: the spec's ``data.data_dir``, searched first among the usual places.
        download: try torchvision's download when nothing is found and the mirror answers.

    Raises:
        DataError: listing every place it looked.
    """
    src = SOURCES[source]
    if data_dir is not None:
        folders = _folders(Path(data_dir).expanduser(), src)
    else:
        folders = candidate_folders(source, spec_dir=spec_dir)
    for folder in folders:
        found = _files_in(folder)
        if found:
            return found
    looked = [str(f) for f in folders]
    if data_dir is None and download:
        found, how = _download(src)
        if found:
            return found
        looked.append(how)
    names = ", ".join(f"{s}[.gz]" for s in PARTS.values())
    hint = f", or on Debian: apt-get install dataset-{src.debian}" if src.debian else ""
    raise DataError(f"{src.title} IDX files ({names}) not found; looked in: {'; '.join(looked)}. "
                    f"Point --data-dir or HPO_DATA_DIR at a folder holding them{hint}")


def _images_and_labels(files: dict[str, Path], split: str, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(files[f"{split}_images"]), read_idx(files[f"{split}_labels"])
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(f"{files[f'{split}_images']}: expected N x H x W images and N labels, "
                        f"got shapes {images.shape} and {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{files[f'{split}_images']}: {len(images)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise DataError(f"{files[f'{split}_labels']}: labels must be 0..{n_classes - 1}, "
                        f"found {labels.min()}..{labels.max()}")
    return images, labels.astype(np.int64)


def _to_tensor(images: np.ndarray, src: ImageSource) -> torch.Tensor:
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1)
    return x.div_(255.0).sub_(src.mean).div_(src.std)


def load_image_dataset(spec: StudySpec, *, data_dir: str | None = None) -> Dataset:
    """Fashion-MNIST or MNIST as normalised CPU tensors (N, 1, 28, 28) with a seeded stratified split.

    Args:
        data_dir: the worker's ``--data-dir``; when given, only that folder is searched.

    Raises:
        DataError: when the files cannot be found (listing where it looked) or are malformed.
    """
    d = spec.data
    if d.source not in SOURCES:
        raise DataError(f"data.source: {d.source!r} is not an image data set; allowed: {', '.join(SOURCES)}")
    src = SOURCES[d.source]
    files = find_idx_files(d.source, data_dir=data_dir, spec_dir=d.data_dir)
    images, labels = _images_and_labels(files, "train", len(src.classes))
    test_images, test_labels = _images_and_labels(files, "test", len(src.classes))
    if len(labels) < 2:
        raise DataError(f"{files['train_images']}: needs at least 2 training images, has {len(labels)}")
    train_idx, val_idx = split_indices(len(labels), val_fraction=d.val_fraction, seed=spec.seed, labels=labels,
                                       train_subset=d.train_subset, val_subset=d.val_subset)
    return Dataset(
        task="classification",
        x=_to_tensor(images, src),
        y=torch.from_numpy(labels),
        train_idx=torch.from_numpy(train_idx),
        val_idx=torch.from_numpy(val_idx),
        x_test=_to_tensor(test_images, src),
        y_test=torch.from_numpy(test_labels),
        in_shape=(1, *images.shape[1:]),
        out_features=len(src.classes),
        classes=src.classes,
        normalization={"scale": 1 / 255, "mean": [src.mean], "std": [src.std]},  # raw pixels x -> (x*scale - mean) / std
    )


def make_augmenter(normalization: dict, *, degrees: float = 10.0, translate: float = 0.1,
                   shear: float = 10.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """A batch augmentation: each image gets its own random rotation, translation and shear.

    Everything runs on the batch's device as tensor ops (random numbers included), so it needs no
    host sync and can be captured in a CUDA graph. Pixels shifted in from outside are filled with
    the normalised value of black, the images' background.

    Args:
        normalization: the data set's ``{"mean": [...], "std": [...]}``.
        degrees: rotation drawn from [-degrees, degrees].
        translate: shift drawn from [-translate, translate] of the width / height.
        shear: x shear angle drawn from [-shear, shear] degrees.
    """
    mean = torch.tensor(normalization.get("mean", [0.0]), dtype=torch.float32)
    std = torch.tensor(normalization.get("std", [1.0]), dtype=torch.float32)
    background = (-mean / std).view(1, -1, 1, 1)
    # Moved to the batch's device once, on the first (eager) call: a copy from the host inside a
    # CUDA-graph capture would be refused.
    on_device: dict[tuple, torch.Tensor] = {}

    def augment(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        u = torch.rand(n, 4, device=x.device, dtype=x.dtype) * 2 - 1
        angle, shear_x = u[:, 0] * math.radians(degrees), u[:, 1] * math.radians(shear)
        cos, sin, tan = torch.cos(angle), torch.sin(angle), torch.tan(shear_x)
        # rotation @ shear-in-x, then a translation in affine_grid's [-1, 1] coordinates
        theta = torch.stack([
            torch.stack([cos, cos * tan - sin, u[:, 2] * 2 * translate], 1),
            torch.stack([sin, sin * tan + cos, u[:, 3] * 2 * translate], 1),
        ], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        key = (x.device, x.dtype)
        if key not in on_device:
            on_device[key] = background.to(x.device, x.dtype)
        bg = on_device[key]
        return F.grid_sample(x - bg, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + bg

    return augment
