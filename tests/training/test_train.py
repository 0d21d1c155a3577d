import math

import pytest
import torch
from conftest import STUDIES

from hpo.data.sources import load_dataset
from hpo.errors import TrainingError
from hpo.nn.models import build_model
from hpo.spec.hyperparams import resolve
from hpo.spec.schema import load_spec_file
from hpo.training.trainer import train


@pytest.fixture(scope="module")
def data():
    return load_dataset(load_spec_file(STUDIES / "regression.yaml"))


def fit(data, **hp):
    hp = resolve({"n_layers": 2, "width": [32, 32], "epochs": 60, "batch_size": 16, "lr": 1e-2, **hp})
    torch.manual_seed(0)
    model = build_model("mlp", hp, in_shape=data.in_shape, out_features=data.out_features)
    return model, train(model, data, hp, seed=0)


def test_regression_data_split_and_normalisation(data):
    assert len(data.x) == 100 and len(data.x_test) == 100
    assert len(data.train_idx) == 80 and len(data.val_idx) == 20
    assert not set(data.train_idx.tolist()) & set(data.val_idx.tolist())
    assert abs(data.x.mean().item()) < 1e-5 and data.x.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)


def test_training_lowers_validation_mse(data):
    _, result = fit(data)
    history = result.history
    assert len(history) == 60
    assert history[-1]["val_mse"] < 0.8 * history[0]["val_mse"] and history[-1]["val_mse"] < 0.3
    assert result.metrics["val_mse"] == history[-1]["val_mse"]


def test_same_seed_same_result(data):
    assert fit(data)[1].history == fit(data)[1].history


def test_callback_sees_every_epoch_and_can_stop(data):
    seen = []

    class Stop(Exception):
        pass

    def on_epoch(epoch, stats):
        seen.append(epoch)
        if epoch == 4:
            raise Stop

    hp = resolve({"epochs": 50})
    model = build_model("mlp", hp, in_shape=data.in_shape, out_features=1)
    with pytest.raises(Stop):
        train(model, data, hp, seed=0, on_epoch=on_epoch)
    assert seen == [0, 1, 2, 3, 4]


def test_diverging_loss_stops_with_a_clear_error(data):
    with pytest.raises(TrainingError, match=r"training loss became (nan|inf) at epoch \d+"):
        fit(data, optimizer="SGD", lr=1e6, epochs=20)


def test_early_stopping_keeps_the_best_weights(data):
    _, result = fit(data, epochs=400, early_stopping=5, lr=3e-2)
    assert result.stopped_early and result.epochs_run < 400
    best = min(h["val_loss"] for h in result.history)
    assert result.metrics["val_loss"] == pytest.approx(best, rel=1e-5)


@pytest.mark.parametrize("scheduler", ["plateau", "exponential"])
def test_schedulers_lower_the_learning_rate(data, scheduler):
    _, result = fit(data, scheduler=scheduler, lr_decay=0.9, plateau_patience=1, plateau_factor=0.5, epochs=30)
    lrs = [h["lr"] for h in result.history]
    assert lrs[-1] < lrs[0]
    if scheduler == "exponential":
        assert lrs[10] == pytest.approx(1e-2 * 0.9**10)
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
