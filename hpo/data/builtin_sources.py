"""hpo's own registry data sources (``hpo.data.registry``), registered in hpo's pyproject under
``hpo.data`` as any package's would be:

- ``npz``: ``data.train`` / ``data.test`` are ``.npz`` files with arrays ``x`` (``(N, F)`` features,
  or ``(N, C, H, W)`` uint8 images) and ``y``, and optionally ``classes`` (names);
- ``image_folder``: ``data.train`` / ``data.test`` are folders in torchvision's ImageFolder layout
  (one sub-folder per class, named for it), decoded once into one uint8 array (grey images give one
  channel, any colour image makes them all RGB);
- ``cifar10``, ``cifar100``, ``svhn``, ``kmnist``: torchvision's files of those sets, under
  ``data.data_dir`` (or ``$HPO_DATA_DIR``, ``./data``, ``~/.cache/hpo/data``) in torchvision's
  layout. hpo never downloads them.

Each refuses bad files in one line naming the file.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from hpo.data.registry import Arrays, Source
from hpo.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


def _need(path: str | None, part: str, source: str) -> Path:
    if path is None:
        raise DataError(f"data.{part}: source {source} needs data.{part} (a path)")
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: not found (data.{part})")
    return p


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    from hpo.data.tables import size_text
    from hpo.store.config import max_data_bytes

    size, limit = path.stat().st_size, max_data_bytes()
    if size > limit:
        raise DataError(f"{path}: {size_text(size)}, over the store's limit of {size_text(limit)} per study "
                        f"(HPO_MAX_DATA_BYTES={limit}); raise it, or use less data")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("x", "y") if k not in z.files]
            if missing:
                raise DataError(f"{path}: no array {', '.join(missing)}; the file has {', '.join(z.files) or 'none'}")
            classes = tuple(str(c) for c in z["classes"]) if "classes" in z.files else ()
            x, y = z["x"], z["y"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path}: cannot read as .npz: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    if len(x) != len(y):
        raise DataError(f"{path}: x has {len(x)} samples, y {len(y)}")
    return x, y, classes


def read_npz(*, train: str | None, test: str | None, data_dir: str | None = None) -> Arrays:
    """The ``npz`` source (see the module docstring)."""
    x, y, classes = _read_npz(_need(train, "train", "npz"))
    x_test, y_test, test_classes = _read_npz(_need(test, "test", "npz"))
    if classes and test_classes and classes != test_classes:
        raise DataError(f"{test}: classes {list(test_classes)} differ from {train}'s {list(classes)}")
    if x.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{test}: samples of shape {x_test.shape[1:]}, but {train}'s are {x.shape[1:]}")
    return Arrays(x, y, x_test, y_test, classes or test_classes)


def image_files(folder: Path) -> list[Path]:
    """The image files of a folder (by extension, case-insensitive), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def decode_images(files: list[Path], *, channels: int | None = None) -> np.ndarray:
    """Images of one size as one uint8 array ``(N, C, H, W)``: C=1 when every image is grey, else 3
    (RGB); ``channels`` (1 or 3) converts them to that many instead.

    Raises:
        DataError: naming the first file that cannot be read as an image or differs in size.
    """
    from PIL import Image, UnidentifiedImageError

    images, grey, first = [], True, None
    for path in files:
        try:
            with Image.open(path) as im:
                im.load()
                grey = grey and im.mode in ("1", "L", "I", "I;16", "F")
                images.append(im.copy())
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read as an image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
        if first is None:
            first = (path, images[-1].size)
        elif images[-1].size != first[1]:
            w, h = images[-1].size
            raise DataError(f"{path}: {w}x{h} pixels, but {first[0]} is {first[1][0]}x{first[1][1]}: "
                            "the images of a study must have one size")
    mode = "L" if (grey if channels is None else channels == 1) else "RGB"
    out = np.stack([np.asarray(im.convert(mode), dtype=np.uint8) for im in images])
    return out[:, None] if grey else out.transpose(0, 3, 1, 2)


def _image_folder(root: Path, classes: tuple[str, ...] | None) -> tuple[list[Path], np.ndarray, tuple[str, ...]]:
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (image_folder wants one sub-folder of images per class)")
    found = tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")))
    if classes is None:
        if len(found) < 2:
            raise DataError(f"{root}: {len(found)} class folder{'s' if len(found) != 1 else ''} "
                            f"({', '.join(found) or 'none'}); a classification needs at least 2")
        classes = found
    else:
        extra = [c for c in found if c not in classes]
        if extra:
            raise DataError(f"{root / extra[0]}: class {extra[0]!r} is not among the training classes {list(classes)}")
    files, labels = [], []
    for i, name in enumerate(classes):
        folder = root / name
        these = image_files(folder) if folder.is_dir() else []
        if not these and classes is found:
            raise DataError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
        files += these
        labels += [i] * len(these)
    if not files:
        raise DataError(f"{root}: no image files in its class folders")
    return files, np.asarray(labels, dtype=np.int64), classes


def read_image_folder(*, train: str | None, test: str | None, data_dir: str | None = None) -> Arrays:
    """The ``image_folder`` source (see the module docstring)."""
    files, y, classes = _image_folder(_need(train, "train", "image_folder"), None)
    test_files, y_test, _ = _image_folder(_need(test, "test", "image_folder"), classes)
    x, x_test = decode_images(files), decode_images(test_files)
    if x.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{test_files[0]}: {x_test.shape[3]}x{x_test.shape[2]} pixels, {x_test.shape[1]} channel(s), "
                        f"but {files[0]} is {x.shape[3]}x{x.shape[2]}, {x.shape[1]} channel(s)")
    return Arrays(x, y, x_test, y_test, classes)


def _roots(data_dir: str | None) -> list[Path]:
    roots = [Path(p).expanduser() for p in (data_dir, os.environ.get("HPO_DATA_DIR")) if p]
    return list(dict.fromkeys(roots + [Path.cwd() / "data", Path("~/.cache/hpo/data").expanduser()]))


def _torchvision(name: str, make) -> Arrays:
    """A torchvision data set from the first root that holds its files (never downloaded)."""
    problems, last = [], ""
    for root in _roots(make.data_dir):
        try:
            train, test = make.train(str(root)), make.test(str(root))
        except (RuntimeError, OSError) as e:  # torchvision: "Dataset not found or corrupted"
            problems.append(str(root))
            last = str(e).splitlines()[0] if str(e) else type(e).__name__
            continue
        return make.arrays(train, test)
    raise DataError(f"data.source {name}: torchvision's files not found in {', '.join(problems)} ({last}); "
                    f"hpo never downloads them: put them under data.data_dir or $HPO_DATA_DIR in torchvision's layout")


class _TV:
    def __init__(self, cls: str, data_dir: str | None):
        import torchvision.datasets as tvd

        self.cls, self.tvd, self.data_dir = getattr(tvd, cls), tvd, data_dir

    def train(self, root: str):
        return self._make(root, True)

    def test(self, root: str):
        return self._make(root, False)

    def _make(self, root: str, train: bool):
        if self.cls is self.tvd.SVHN:
            return self.cls(root, split="train" if train else "test", download=False)
        return self.cls(root, train=train, download=False)

    def arrays(self, train, test) -> Arrays:
        def xy(ds):
            x = np.asarray(ds.data, dtype=np.uint8)
            if x.ndim == 3:  # KMNIST: (N, H, W)
                x = x[:, None]
            elif x.shape[-1] == 3:  # CIFAR: (N, H, W, C)
                x = x.transpose(0, 3, 1, 2)
            y = np.asarray(ds.labels if hasattr(ds, "labels") else ds.targets, dtype=np.int64)
            return np.ascontiguousarray(x), y

        x, y = xy(train)
        x_test, y_test = xy(test)
        classes = tuple(getattr(train, "classes", None) or (str(i) for i in range(int(y.max()) + 1)))
        return Arrays(x, y, x_test, y_test, classes)


def _tv_reader(name: str, cls: str):
    def read(*, train: str | None = None, test: str | None = None, data_dir: str | None = None) -> Arrays:
        return _torchvision(name, _TV(cls, data_dir))
    return read


npz = Source("npz", read_npz, tasks=("classification", "regression"),
             description="arrays x, y in .npz files (data.train, data.test)")
image_folder = Source("image_folder", read_image_folder,
                      description="one sub-folder of images per class (data.train, data.test folders)")
cifar10 = Source("cifar10", _tv_reader("cifar10", "CIFAR10"), paths=(), description="torchvision's CIFAR-10 files")
cifar100 = Source("cifar100", _tv_reader("cifar100", "CIFAR100"), paths=(), description="torchvision's CIFAR-100 files")
svhn = Source("svhn", _tv_reader("svhn", "SVHN"), paths=(), description="torchvision's SVHN files")
kmnist = Source("kmnist", _tv_reader("kmnist", "KMNIST"), paths=(), description="torchvision's KMNIST files")
