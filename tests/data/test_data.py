import pytest

from hpo.data.tables import read_csv_table
from hpo.errors import DataError


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
