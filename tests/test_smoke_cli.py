from conftest import run_hpo, small_regression_spec


def test_create_and_work_small_study(tmp_path, cli_env):
    spec = small_regression_spec(tmp_path)
    run_hpo("create-study", str(spec), env=cli_env, check=0)
    proc = run_hpo("worker", "--study", "regression", "--n-trials", "6", env=cli_env, check=0)
    assert "Number of finished trials: 6" in proc.stdout
