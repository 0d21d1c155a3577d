import gzip
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_hpo

from hpo.data import images
from hpo.data.images import (
    PARTS,
    SOURCES,
    find_idx_files,
    load_image_dataset,
    make_augmenter,
    read_idx,
)
from hpo.errors import DataError
from hpo.spec.schema import parse_spec

DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, *, n_train: int = 60, n_test: int = 20, gz: bool = False, seed: int = 0) -> dict:
    """Four tiny IDX files: labels cycle through 0..9, every image is filled with its own label * 20."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        arrays[f"{split}_labels"] = labels.astype(np.uint8)
        arrays[f"{split}_images"] = np.broadcast_to((labels * 20)[:, None, None], (n, 28, 28)).astype(np.uint8)
    for part, array in arrays.items():
        data = idx_bytes(array)
        if gz:
            (folder / f"{PARTS[part]}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / PARTS[part]).write_bytes(data)
    return arrays


def image_spec(source: str = "fashion_mnist", **data):
    return parse_spec({"name": "img", "model": "cnn", "data": {"source": source, **data}})


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, gz):
    arrays = write_idx_set(tmp_path, gz=gz)
    suffix = ".gz" if gz else ""
    images = read_idx(tmp_path / f"{PARTS['train_images']}{suffix}")
    labels = read_idx(tmp_path / f"{PARTS['train_labels']}{suffix}")
    assert images.shape == (60, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, arrays["train_images"])
    np.testing.assert_array_equal(labels, arrays["train_labels"])


def test_read_idx_refuses_truncated_and_foreign_files(tmp_path):
    write_idx_set(tmp_path)
    path = tmp_path / PARTS["train_images"]
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DataError, match="header .* says"):
        read_idx(path)
    path.write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(path)


@pytest.mark.parametrize("source", ["fashion_mnist", "mnist"])
@pytest.mark.parametrize("gz", [False, True])
def test_load_tiny_dataset(tmp_path, source, gz):
    arrays = write_idx_set(tmp_path, gz=gz)
    data = load_image_dataset(image_spec(source), data_dir=str(tmp_path))
    src = SOURCES[source]
    assert data.x.shape == (60, 1, 28, 28) and data.x.dtype == torch.float32
    assert data.y.dtype == torch.int64 and data.x_test.shape == (20, 1, 28, 28)
    assert data.in_shape == (1, 28, 28) and data.out_features == 10 and data.classes == src.classes
    assert data.normalization == {"scale": 1 / 255, "mean": [src.mean], "std": [src.std]}
    # pixel value v becomes (v/255 - mean) / std, and each image still matches its label
    expected = (torch.from_numpy(arrays["train_labels"]).float() * 20 / 255 - src.mean) / src.std
    torch.testing.assert_close(data.x[:, 0, 5, 5], expected)
    assert len(data.train_idx) == 48 and len(data.val_idx) == 12
    assert not set(data.train_idx.tolist()) & set(data.val_idx.tolist())
    # stratified: every class keeps its share in the validation split
    assert sorted(torch.bincount(data.y[data.val_idx], minlength=10).tolist()) == [1] * 8 + [2, 2]


def test_fashion_mnist_class_names():
    assert SOURCES["fashion_mnist"].classes == ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                                "Shirt", "Sneaker", "Bag", "Ankle boot")


def test_subsets_and_seeded_split(tmp_path):
    write_idx_set(tmp_path, n_train=200)
    spec = image_spec(train_subset=50, val_subset=20, val_fraction=0.25)
    a = load_image_dataset(spec, data_dir=str(tmp_path))
    b = load_image_dataset(spec, data_dir=str(tmp_path))
    c = load_image_dataset(replace(spec, seed=1), data_dir=str(tmp_path))
    assert len(a.train_idx) == 50 and len(a.val_idx) == 20
    assert torch.equal(a.train_idx, b.train_idx) and not torch.equal(a.train_idx, c.train_idx)


def test_torchvision_layout_and_env_var(tmp_path, monkeypatch):
    write_idx_set(tmp_path / "root" / "FashionMNIST" / "raw", gz=True)
    monkeypatch.setenv("HPO_DATA_DIR", str(tmp_path / "root"))
    files = find_idx_files("fashion_mnist", download=False)
    assert images.candidate_folders("fashion_mnist")[-1] == DEBIAN
    assert files["train_images"] == tmp_path / "root" / "FashionMNIST" / "raw" / f"{PARTS['train_images']}.gz"
    # the spec's data_dir comes before HPO_DATA_DIR
    write_idx_set(tmp_path / "spec_dir")
    files = find_idx_files("fashion_mnist", spec_dir=str(tmp_path / "spec_dir"), download=False)
    assert files["train_labels"] == tmp_path / "spec_dir" / PARTS["train_labels"]


def test_error_lists_every_place_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HPO_DATA_DIR", str(tmp_path / "nowhere"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(images, "_network_allows", lambda address: False)  # offline: no download attempt
    with pytest.raises(DataError) as e:
        find_idx_files("mnist", spec_dir=str(tmp_path / "spec_dir"))
    message = str(e.value)
    assert "\n" not in message and message.startswith("MNIST IDX files")
    assert "download skipped (ossci-datasets.s3.amazonaws.com not reachable)" in message
    for place in (tmp_path / "spec_dir", tmp_path / "nowhere" / "MNIST" / "raw", tmp_path / "data"):
        assert str(place) in message
    assert "apt-get" not in message  # Debian packages Fashion-MNIST only
    with pytest.raises(DataError, match="or on Debian: apt-get install dataset-fashion-mnist$"):
        find_idx_files("fashion_mnist", data_dir=str(tmp_path / "nowhere"))


def test_an_explicit_data_dir_is_searched_alone(tmp_path):
    write_idx_set(tmp_path / "elsewhere")
    with pytest.raises(DataError, match=f"looked in: {tmp_path / 'empty'}; {tmp_path / 'empty' / 'FashionMNIST' / 'raw'}"):
        load_image_dataset(image_spec(data_dir=str(tmp_path / "elsewhere")), data_dir=str(tmp_path / "empty"))


def test_labels_out_of_range_are_refused(tmp_path):
    write_idx_set(tmp_path)
    bad = np.full(60, 12, dtype=np.uint8)
    (tmp_path / PARTS["train_labels"]).write_bytes(idx_bytes(bad))
    with pytest.raises(DataError, match=r"labels must be 0..9, found 12..12"):
        load_image_dataset(image_spec(), data_dir=str(tmp_path))


@pytest.mark.skipif(not DEBIAN.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_debian_fashion_mnist():
    files = find_idx_files("fashion_mnist", data_dir=str(DEBIAN))
    assert files["train_images"].name == "train-images-idx3-ubyte.gz"
    data = load_image_dataset(image_spec(train_subset=2000, val_subset=1000), data_dir=str(DEBIAN))
    assert data.x.shape == (60000, 1, 28, 28) and data.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(data.y).tolist() == [6000] * 10 and torch.bincount(data.y_test).tolist() == [1000] * 10
    assert abs(data.x.mean().item()) < 0.01 and abs(data.x.std().item() - 1) < 0.01  # the recorded mean/std fit
    assert len(data.train_idx) == 2000 and len(data.val_idx) == 1000


def test_augmentation_keeps_shapes_labels_and_background():
    torch.manual_seed(0)
    norm = {"mean": [0.2860], "std": [0.3530]}
    background = -0.2860 / 0.3530
    x = torch.full((16, 1, 28, 28), background)
    x[:, :, 10:18, 10:18] = 2.0  # a bright square in the middle of a black image
    y = torch.arange(16)
    augment = make_augmenter(norm)
    out = augment(x)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.equal(y, torch.arange(16))
    # each image moved differently, black stays black at the borders, the square's mass roughly kept
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out, x)
    torch.testing.assert_close(out[:, :, 0, :], torch.full_like(out[:, :, 0, :], background))
    mass = (out - background).sum(dim=(1, 2, 3)) / (x - background).sum(dim=(1, 2, 3))
    assert ((mass > 0.75) & (mass < 1.25)).all()
    torch.manual_seed(0)
    torch.testing.assert_close(make_augmenter(norm)(x), out)  # seeded: the same draw again


@pytest.mark.slow
def test_cli_worker_with_a_data_dir_without_the_files(tmp_path, cli_env):
    spec = tmp_path / "img.yaml"
    spec.write_text("name: img\nmodel: cnn\ndata: {source: fashion_mnist}\nbudget: {n_trials: 1}\n")
    run_hpo("create-study", str(spec), env=cli_env, check=0)
    (tmp_path / "empty").mkdir()
    proc = run_hpo("worker", "--study", "img", "--data-dir", str(tmp_path / "empty"), env=cli_env, check=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Fashion-MNIST IDX files" in lines[0] and str(tmp_path / "empty") in lines[0]
