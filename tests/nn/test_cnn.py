from dataclasses import replace

import pytest
import torch
import yaml
from conftest import STUDIES, run_hpo
from test_images import write_idx_set
from torch import nn

from hpo.errors import SpecError, TrainingError
from hpo.nn.cnn import build_cnn, check_cnn_spec, conv_shapes
from hpo.nn.models import build_model
from hpo.spec.hyperparams import resolve
from hpo.spec.schema import load_spec_file, parse_spec

LENET = {"n_conv": 2, "filters": [6, 16], "kernel_size": 5, "padding": 2, "pooling": "max", "batch_norm": False,
         "n_dense": 2, "dense_width": [120, 84], "conv_dropout": 0.4, "dropout": 0.2}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_lenet5_has_61706_parameters():
    # by hand: conv 1->6 5x5 (+bias), conv 6->16 5x5, 28 pad 2 -> 28 -> pool 14 -> 10 -> pool 5, fc 400-120-84-10
    hand = (1 * 6 * 25 + 6) + (6 * 16 * 25 + 16) + (16 * 5 * 5 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
    assert hand == 61_706
    model = build_cnn(resolve(LENET), in_shape=(1, 28, 28), out_features=10)
    assert n_params(model) == hand
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert conv_shapes(resolve(LENET), in_shape=(1, 28, 28)) == [(6, 14, 14), (16, 5, 5)]
    assert [type(m).__name__ for m in model] == [
        "Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d", "Flatten", "Dropout",
        "Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]


def test_the_shipped_fmnist_spec_builds_the_seed_lenet5():
    spec = load_spec_file(STUDIES / "fmnist.yaml")
    hp = resolve({**spec.fixed, "conv_dropout": 0.3, "dropout": 0.3})
    assert n_params(build_model(spec.model, hp, in_shape=(1, 28, 28), out_features=10)) == 61_706
    assert spec.budget.n_trials == 300 and spec.retrain.folds == 10 and spec.pruner.kind == "median"
    assert (spec.data.train_subset, spec.data.val_subset) == (10_000, 5_000)


@pytest.mark.parametrize("pooling", ["max", "avg", "stride2"])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_wider_cnn_shapes_and_counts(pooling, batch_norm):
    hp = resolve({"n_conv": 3, "filters": [32, 64, 64], "kernel_size": 3, "padding": 1, "pooling": pooling,
                  "batch_norm": batch_norm, "n_dense": 1, "dense_width": 128, "activation": "gelu", "init": "kaiming"})
    model = build_cnn(hp, in_shape=(1, 28, 28), out_features=10)
    assert model(torch.randn(4, 1, 28, 28)).shape == (4, 10)
    shapes = conv_shapes(hp, in_shape=(1, 28, 28))
    assert shapes == [(32, 14, 14), (64, 6, 6), (64, 2, 2)]  # a stride-2 conv and conv + 2x2 pool agree here
    convs = (1 * 32 * 9) + (32 * 64 * 9) + (64 * 64 * 9)
    bias_or_bn = 2 * (32 + 64 + 64) if batch_norm else (32 + 64 + 64)
    dense = 64 * 2 * 2 * 128 + 128 + 128 * 10 + 10
    assert n_params(model) == convs + bias_or_bn + dense
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model) == (3 if batch_norm else 0)
    assert sum(isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) for m in model) == (0 if pooling == "stride2" else 3)


def test_per_conv_padding_list():
    hp = resolve({**LENET, "padding": [2, 2]})
    assert conv_shapes(hp, in_shape=(1, 28, 28)) == [(6, 14, 14), (16, 7, 7)]


def test_image_shrinking_below_1x1_is_one_clear_line():
    hp = resolve({**LENET, "n_conv": 3, "filters": [6, 16, 32]})  # block 3: 5x5 -> conv 5x5 -> 1x1 -> pool
    with pytest.raises(TrainingError, match=r"^cnn: conv block 3 \(max pooling\) shrinks the image below 1x1") as e:
        build_cnn(hp, in_shape=(1, 28, 28), out_features=10)
    assert "\n" not in str(e.value)


def test_kernel_larger_than_its_input_is_one_clear_line():
    hp = resolve({**LENET, "n_conv": 4, "filters": [8, 8, 8, 8], "kernel_size": 3, "padding": 1})
    with pytest.raises(TrainingError, match=r"^cnn: conv block 4 has kernel_size 3 but its input is 2x2"):
        build_cnn(hp, in_shape=(1, 28, 28), out_features=10)
    with pytest.raises(TrainingError, match="needs image input"):
        build_cnn(resolve(LENET), in_shape=(784,), out_features=10)


def _spec(**space):
    raw = {"name": "shapes", "model": "cnn", "data": {"source": "fashion_mnist"}, "space": space,
           "fixed": {"kernel_size": 5, "padding": 0, "filters": 4}}
    return parse_spec(raw)


def test_create_study_check_refuses_a_space_where_nothing_fits():
    with pytest.raises(SpecError, match="no configuration fits a 28x28 image"):
        check_cnn_spec(_spec(n_conv={"int": [3, 5]}))
    warning = check_cnn_spec(_spec(n_conv={"int": [1, 4]}))
    assert warning.startswith("some configurations do not fit the image") and "conv block" in warning
    assert check_cnn_spec(_spec(n_conv={"int": [1, 2]})) is None
    with pytest.raises(SpecError, match="cnn needs an image data source"):
        check_cnn_spec(replace(_spec(), data=replace(_spec().data, source="csv")))
    for name in ("fmnist", "fmnist-cnn", "mnist"):
        assert check_cnn_spec(load_spec_file(STUDIES / f"{name}.yaml")) is None


@pytest.mark.slow
def test_worker_survives_configurations_that_do_not_fit(tmp_path, cli_env):
    """Trials whose layers do not fit FAIL with the reason in their attrs; the worker goes on."""
    write_idx_set(tmp_path / "data", n_train=60, n_test=20, gz=True)
    raw = yaml.safe_load((STUDIES / "fmnist.yaml").read_text())
    raw["space"] = {"n_conv": {"choice": [2, 5]}, "epochs": {"int": [1, 2]}}
    del raw["fixed"]["n_conv"]
    raw["fixed"]["filters"] = 4
    raw["budget"] = {"n_trials": 4}
    raw["sampler"] = {"kind": "random"}
    raw["data"].update(train_subset=40, val_subset=10)
    spec = tmp_path / "fmnist.yaml"
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    run_hpo("create-study", str(spec), env=cli_env, check=0)
    proc = run_hpo("worker", "--study", "fmnist", "--data-dir", str(tmp_path / "data"), env=cli_env, check=0)
    assert "Number of finished trials: 4" in proc.stdout

    import optuna

    study = optuna.load_study(study_name="fmnist", storage=cli_env["HPO_STORAGE"])
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert {t.params["n_conv"] for t in failed} == {5} and {t.params["n_conv"] for t in complete} == {2}
    assert all(t.user_attrs["fail_reason"].startswith("TrainingError: cnn: conv block") for t in failed), [t.user_attrs for t in failed]


@pytest.mark.slow
def test_gpu_that_does_not_exist_is_exit_2(cli_env):
    proc = run_hpo("worker", "--study", "fmnist", "--gpu", "3", env=cli_env, check=2)
    assert proc.stderr.strip() == "hpo: error: --gpu: GPU 3 does not exist; available: none (no CUDA device visible)" \
        or proc.stderr.strip().startswith("hpo: error: --gpu: GPU 3 does not exist; available: 0..")
