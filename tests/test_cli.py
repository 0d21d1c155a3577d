import os

import pytest
from conftest import STUDIES, run_hpo, small_regression_spec


def one_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("hpo: error: ")
    return lines[0]


def studies_listed(env) -> str:
    return run_hpo("studies", env=env, check=0).stdout


def test_create_worker_status_studies(tmp_path, cli_env):
    spec = small_regression_spec(tmp_path)
    out = run_hpo("create-study", str(spec), env=cli_env, check=0).stdout
    assert "created study 'regression'" in out
    work = run_hpo("worker", "--study", "regression", "--n-trials", "5", "--device", "cpu", env=cli_env, check=0).stdout
    assert sum(line.startswith("trial ") for line in work.splitlines()) == 5
    status = run_hpo("status", "--study", "regression", env=cli_env, check=0).stdout
    for field in ("Number of finished trials: 5", "Number of pruned trials:", "Number of complete trials:", "Best params:"):
        assert field in status
    assert "regression" in studies_listed(cli_env)


def test_create_study_by_name_from_studies_folder(cli_env):
    out = run_hpo("create-study", "regression", env=cli_env, check=0).stdout
    assert "budget 500 trials" in out
    err = one_error_line(run_hpo("create-study", "regression", env=cli_env, check=2))
    assert "already exists; pass --force" in err
    run_hpo("create-study", "regression", "--force", env=cli_env, check=0)


def write_spec(tmp_path, text: str):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return str(path)


def regression_text(**replace) -> str:
    text = (STUDIES / "regression.yaml").read_text()
    text = text.replace("data/regression_", str(STUDIES / "data" / "regression_"))
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    return text


@pytest.mark.parametrize(
    "text, expected",
    [
        (lambda: regression_text(**{"[Adam, SGD, RMSprop]": "[Adam, Adamax]"}), "space.optimizer.choice[1]: got 'Adamax'; allowed: Adam, SGD, RMSprop"),
        (lambda: regression_text(**{"activation: relu": "activation: swish"}), "fixed.activation: got 'swish'"),
        (lambda: regression_text(**{"[1.0e-4, 1.0e-2]": "[1.0e-2, 1.0e-4]"}), "space.lr.float: got [0.01, 0.0001]; allowed: low < high"),
        (lambda: regression_text(**{"{int: [4, 50]}": "{int: [50, 50]}"}), "space.batch_size.int: got [50, 50]; allowed: low < high"),
        (lambda: "name: x\nspace: [1, 2", "malformed YAML"),
        (lambda: "", "top level: got null; allowed: a mapping"),
    ],
)
def test_bad_specs_exit_2_with_one_line_and_create_nothing(tmp_path, cli_env, text, expected):
    err = one_error_line(run_hpo("create-study", write_spec(tmp_path, text()), env=cli_env, check=2))
    assert expected in err
    assert "no studies in the store" in studies_listed(cli_env)


def test_unknown_study_names(cli_env):
    assert "no study spec named 'nope'" in one_error_line(run_hpo("create-study", "nope", env=cli_env, check=2))
    err = one_error_line(run_hpo("worker", "--study", "nope", env=cli_env, check=2))
    assert "no study named 'nope' in the store" in err
    assert "no study named 'nope'" in one_error_line(run_hpo("status", "--study", "nope", env=cli_env, check=2))


@pytest.mark.parametrize(
    "csv, expected",
    [
        ("x,y\n1.0,2.0\n2.0,\n", "line 3, column 'y': missing value"),
        ("x,y\n1.0,2.0\nabc,1.0\n", "line 3, column 'x': expected a finite number, got 'abc'"),
        ("x,y\n1.0,2.0\n1e400,1.0\n", "line 3, column 'x': expected a finite number, got '1e400'"),
        ("x,y\n1,2\n3,4,5\n", "cannot read as CSV: Error tokenizing data. C error: Expected 2 fields in line 3, saw 3"),
        ('x,y\n"1,2\n', "cannot read as CSV: Error tokenizing data. C error: EOF inside string"),
        ("x,y\n1,2\n", "1 row cannot be split into training and validation rows (data.val_fraction 0.2); "
                        "it needs at least 2 rows"),
        # an empty line 4 and a missing y on line 12: the file's own line numbers
        ("x,y\n1,1\n2,2\n\n" + "".join(f"{i},{i}\n" for i in range(5, 12)) + "12,\n", "line 12, column 'y': missing value"),
        ("x,z\n1.0,2.0\n", "missing column(s) y"),
        ("", "cannot read as CSV"),
    ],
)
def test_bad_csv_exit_2(tmp_path, cli_env, csv, expected):
    (tmp_path / "train.csv").write_text(csv)
    text = regression_text(**{str(STUDIES / "data" / "regression_train.csv"): str(tmp_path / "train.csv")})
    err = one_error_line(run_hpo("create-study", write_spec(tmp_path, text), env=cli_env, check=2))
    assert "train.csv" in err and expected in err
    assert "no studies in the store" in studies_listed(cli_env)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_store_path_non_root(tmp_path, cli_env):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    cli_env["HPO_STORAGE"] = f"sqlite:///{folder / 'sub' / 'hpo.db'}"
    assert "cannot create the store folder" in one_error_line(run_hpo("create-study", "regression", env=cli_env, check=2))


def test_unusable_store_path(tmp_path, cli_env):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cli_env["HPO_STORAGE"] = f"sqlite:///{blocker / 'hpo.db'}"
    err = one_error_line(run_hpo("create-study", "regression", env=cli_env, check=2))
    assert "store" in err and str(blocker) in err


def test_bad_device_and_debug_traceback(cli_env):
    run_hpo("create-study", "regression", env=cli_env, check=0)
    err = one_error_line(run_hpo("worker", "--study", "regression", "--device", "tpu", env=cli_env, check=2))
    assert "--device" in err
    proc = run_hpo("--debug", "worker", "--study", "nope", env=cli_env)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_create_study_refuses_cnn_layers_that_never_fit(tmp_path, cli_env):
    import yaml

    raw = yaml.safe_load((STUDIES / "fmnist.yaml").read_text())
    raw["fixed"].update(n_conv=4, filters=8)
    path = tmp_path / "fmnist.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    err = one_error_line(run_hpo("create-study", str(path), env=cli_env, check=2))
    assert "no configuration fits a 28x28 image" in err
    assert "no studies in the store" in studies_listed(cli_env)
