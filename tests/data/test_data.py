import numpy as np
import pytest

from hpo.data.dataset import split_indices
from hpo.data.tables import read_csv_table
from hpo.errors import DataError


def test_split_is_seeded_disjoint_and_stratified():
    labels = np.repeat(np.arange(4), 25)
    train, val = split_indices(100, val_fraction=0.2, seed=3, labels=labels)
    again = split_indices(100, val_fraction=0.2, seed=3, labels=labels)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    assert len(val) == 20 and not set(train) & set(val)
    assert np.bincount(labels[val]).tolist() == [5, 5, 5, 5]


def test_split_with_a_class_too_rare_to_stratify():
    labels = np.array([0] * 9 + [1])  # one row of class 1: stratifying is impossible
    train, val = split_indices(10, val_fraction=0.3, seed=0, labels=labels)
    assert len(train) == 7 and len(val) == 3 and sorted([*train, *val]) == list(range(10))


def test_subsets_cut_the_split():
    train, val = split_indices(1000, val_fraction=0.2, seed=0, train_subset=100, val_subset=50)
    assert len(train) == 100 and len(val) == 50


def test_csv_errors_give_the_files_line_numbers(tmp_path):
    """Blank lines (skipped by pandas) and a quoted field over two lines do not shift the line named."""
    path = tmp_path / "t.csv"
    rows = ["x,y", "1,1", "2,2", ""] + [f"{i},{i}" for i in range(5, 12)] + ["12,"]
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"t.csv: line 12, column 'y': missing value"):
        read_csv_table(str(path), ("x", "y"))
    path.write_text('x,y,note\n\n  \n1,1,"two\nlines"\n2,oops,n\n')
    with pytest.raises(DataError, match=r"t.csv: line 6, column 'y': expected a finite number, got 'oops'"):
        read_csv_table(str(path), ("x", "y"))
