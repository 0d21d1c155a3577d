"""hpo's own registry sources (npz, image_folder, torchvision's files): read once into arrays kept
in the store, turned into the Dataset every stage takes, and bad files refused in one line naming
the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from plugin_package import digits_folders

from hpo.data.arrays import store_arrays
from hpo.data.builtin_sources import read_image_folder, read_npz
from hpo.data.registry import source
from hpo.data.sources import load_dataset
from hpo.errors import DataError
from hpo.spec.schema import parse_spec


def spec_of(data: dict, model: str = "mlp"):
    return parse_spec({"name": "s", "model": model, "data": data}, source="s.yaml")


def refused(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as err:
        fn(*args, **kwargs)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_image_folder_becomes_one_uint8_array_in_the_store_and_a_dataset(tmp_path, data_cache):
    train, test = digits_folders(tmp_path, n_train=40, n_test=20)
    a = read_image_folder(train=str(train), test=str(test))
    assert a.x.dtype == np.uint8 and a.x.shape == (40, 3, 8, 8) and a.x_test.shape == (20, 3, 8, 8)
    assert a.classes == tuple(str(i) for i in range(10)) and set(a.y) <= set(range(10))
    spec = store_arrays(spec_of({"source": "image_folder", "train": str(train), "test": str(test)}),
                        cache=data_cache)  # the local copy a worker would otherwise fetch from the store
    ref = spec.data.files["arrays"]
    assert ref["shape"] == [3, 8, 8] and ref["rows"] == 40 and (data_cache / ref["sha256"]).is_file()
    again = parse_spec(spec.to_dict(), source="stored")  # what a worker parses
    assert again.data.files == spec.data.files
    data = load_dataset(again)
    assert data.in_shape == (3, 8, 8) and data.out_features == 10 and data.classes == a.classes
    assert data.normalization["scale"] == pytest.approx(1 / 255) and len(data.normalization["mean"]) == 3
    assert abs(float(data.x[data.train_idx].mean())) < 0.2  # normalised with the pool's statistics


def test_image_folder_refusals_name_the_file(tmp_path):
    train, test = digits_folders(tmp_path, n_train=20, n_test=10)
    one = tmp_path / "one"
    (one / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(one / "cat" / "a.png")
    assert refused(read_image_folder, train=str(one), test=str(test)) == (
        f"{one}: 1 class folder (cat); a classification needs at least 2")
    bad = next((train / "3").iterdir())
    bad.write_bytes(b"not a png")
    assert refused(read_image_folder, train=str(train), test=str(test)).startswith(f"{bad}: cannot read as an image")
    bad.unlink()
    odd = train / "3" / "odd.png"
    Image.new("RGB", (9, 8)).save(odd)
    message = refused(read_image_folder, train=str(train), test=str(test))
    assert message.startswith(f"{odd}: 9x8 pixels, but ") and message.endswith("is 8x8: the images of a study must have one size")


def test_npz_reads_and_refuses_at_the_edge_of_the_stores_limit(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    train, test = tmp_path / "train.npz", tmp_path / "test.npz"
    np.savez(train, x=rng.normal(size=(30, 4)), y=rng.integers(0, 3, 30), classes=np.array(["a", "b", "c"]))
    np.savez(test, x=rng.normal(size=(10, 4)), y=rng.integers(0, 3, 10))
    size = train.stat().st_size
    monkeypatch.setenv("HPO_MAX_DATA_BYTES", str(size))
    a = read_npz(train=str(train), test=str(test))  # exactly at the limit: kept
    assert a.x.shape == (30, 4) and a.classes == ("a", "b", "c")
    monkeypatch.setenv("HPO_MAX_DATA_BYTES", str(size - 1))
    assert refused(read_npz, train=str(train), test=str(test)).startswith(
        f"{train}: {size / 1e3:.1f} kB, over the store's limit of")
    monkeypatch.delenv("HPO_MAX_DATA_BYTES")
    np.savez(test, x=rng.normal(size=(10, 5)), y=rng.integers(0, 3, 10))
    assert refused(read_npz, train=str(train), test=str(test)) == f"{test}: samples of shape (5,), but {train}'s are (4,)"
    np.savez(test, z=np.zeros(3))
    assert refused(read_npz, train=str(train), test=str(test)) == f"{test}: no array x, y; the file has z"
    Path(test).write_bytes(b"junk")
    assert refused(read_npz, train=str(train), test=str(test)).startswith(f"{test}: cannot read as .npz")


def test_torchvision_sets_are_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HPO_DATA_DIR", str(tmp_path / "nothing"))
    message = refused(source("cifar10").read, train=None, test=None, data_dir=str(tmp_path / "empty"))
    assert message.startswith("data.source cifar10: torchvision's files not found in ")
    assert message.endswith("hpo never downloads them: put them under data.data_dir or $HPO_DATA_DIR in torchvision's layout")
    assert not any((tmp_path).rglob("*.tar.gz"))
