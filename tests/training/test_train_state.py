"""The trainer's state at an epoch boundary, and resuming from it: the same training bit for bit
(weights, history, final metrics) as an uninterrupted run, on the eager path and on the CUDA-graph
path's plumbing (CPU stand-in for capture), where the state must go back into the very tensors
the captured step reads."""

import io

import pytest
import torch
from conftest import STUDIES
from test_images import write_idx_set
from test_train_fast import fake_capture

from hpo.data.images import load_image_dataset
from hpo.data.sources import load_dataset
from hpo.nn.models import build_model
from hpo.spec.hyperparams import resolve
from hpo.spec.schema import load_spec_file, parse_spec
from hpo.training import trainer as train_module
from hpo.training.state import TrainState
from hpo.training.trainer import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MLP = {"n_layers": 2, "width": [16, 16], "epochs": 40, "batch_size": 8, "lr": 3e-3, "optimizer": "Adam",
       "scheduler": "plateau", "plateau_factor": 0.5, "plateau_patience": 2, "early_stopping": 12}
CNN = {"n_conv": 2, "filters": [4, 8], "kernel_size": 3, "padding": 1, "n_dense": 1, "dense_width": 16,
       "dropout": 0.3, "conv_dropout": 0.2, "batch_norm": True, "augment": True, "epochs": 5, "batch_size": 16,
       "optimizer": "SGD", "momentum": 0.9, "lr": 0.05, "scheduler": "exponential", "lr_decay": 0.8}


@pytest.fixture(scope="module")
def regression():
    return load_dataset(load_spec_file(STUDIES / "regression.yaml"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("idx")
    write_idx_set(folder, n_train=100, n_test=20)
    return load_image_dataset(parse_spec({"name": "img", "model": "cnn", "data": {"source": "fashion_mnist"}}),
                              data_dir=str(folder))


def run(data, family, hp, *, resume=None, checkpoint=None, graph=False, monkeypatch=None):
    torch.manual_seed(7)
    model = build_model(family, hp, in_shape=data.in_shape, out_features=data.out_features)
    if graph:
        make_optimizer = train_module.make_optimizer
        monkeypatch.setattr(train_module, "graph_problem", lambda device, hp: "")
        monkeypatch.setattr(train_module, "_cuda_capture", fake_capture(model))
        # capturable Adam/RMSprop need CUDA: the stand-in keeps their state on the CPU
        monkeypatch.setattr(train_module, "make_optimizer", lambda params, hp, capturable=False: make_optimizer(params, hp))
    result = train(model, data, hp, seed=3, resume=resume, checkpoint=checkpoint, cuda_graph=graph)
    if graph:
        monkeypatch.undo()
    return model, result


def state_at(data, family, hp, k, **kwargs):
    """The state offered at boundary k, through a file as a checkpoint keeps it, then training
    stopped there (as a killed worker would)."""
    saved = {}

    class Stop(Exception):
        pass

    def checkpoint(done, state):
        if done == k:
            buffer = io.BytesIO()
            torch.save(state().to_dict(), buffer)
            saved["state"] = TrainState.from_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
            raise Stop

    with pytest.raises(Stop):
        run(data, family, hp, checkpoint=checkpoint, **kwargs)
    return saved["state"]


def assert_same(a, b):
    (model_a, result_a), (model_b, result_b) = a, b
    assert result_a.history == result_b.history
    assert result_a.metrics == result_b.metrics
    assert (result_a.epochs_run, result_a.stopped_early) == (result_b.epochs_run, result_b.stopped_early)
    for (name, x), y in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("k", [1, 5, 9])
def test_mlp_with_early_stopping_and_plateau_resumes_bit_for_bit(regression, k):
    hp = resolve(MLP)
    whole = run(regression, "mlp", hp)
    assert whole[1].stopped_early and 12 < whole[1].epochs_run < 40  # early stopping and restore both act
    assert len({h["lr"] for h in whole[1].history}) > 1  # and the plateau schedule cut the lr
    state = state_at(regression, "mlp", hp, k)
    assert state.epoch == k and len(state.history) == k
    resumed = run(regression, "mlp", hp, resume=state)
    assert resumed[1].resumed_from_epoch == k
    assert_same(resumed, whole)


@pytest.mark.parametrize("k", [1, 3])
def test_cnn_with_dropout_batch_norm_and_augmentation_resumes_bit_for_bit(images, k):
    hp = resolve(CNN)
    whole = run(images, "cnn", hp)
    resumed = run(images, "cnn", hp, resume=state_at(images, "cnn", hp, k))
    assert_same(resumed, whole)


@pytest.mark.parametrize("optimizer", ["Adam", "RMSprop", "SGD"])
def test_graph_path_resumes_in_place(images, monkeypatch, optimizer):
    """On the graph path the state goes back into the tensors the captured step already holds
    (weights, optimizer moments), after capture. The stand-in replays the step's Python, which
    would follow a swapped tensor where a real graph would not: the tensors are checked to be
    the very ones held before the restore."""
    hp = resolve({**CNN, "optimizer": optimizer, "scheduler": "none" if optimizer == "SGD" else "plateau",
                  "momentum": 0.5})
    whole = run(images, "cnn", hp, graph=True, monkeypatch=monkeypatch)
    assert whole[1].path == "cuda_graph"
    held = {}
    real_load = train_module.train_state.load_optimizer_in_place

    def tensors(optimizer):
        return {id(t) for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)}

    def spying(optimizer, saved):
        before = tensors(optimizer)  # made by the warm-up before capture, zeroed in place since
        real_load(optimizer, saved)
        held["same"] = bool(before) and tensors(optimizer) == before

    state = state_at(images, "cnn", hp, 2, graph=True, monkeypatch=monkeypatch)
    monkeypatch.setattr(train_module.train_state, "load_optimizer_in_place", spying)
    resumed = run(images, "cnn", hp, resume=state, graph=True, monkeypatch=monkeypatch)
    assert held["same"] and resumed[1].path == "cuda_graph"
    assert_same(resumed, whole)
    # and the eager path resumes from the graph path's state (a trial moved to another worker)
    assert_same(run(images, "cnn", hp, resume=state), whole)


def test_a_state_that_does_not_fit_is_refused(regression):
    hp = resolve(MLP)
    state = state_at(regression, "mlp", hp, 2)
    with pytest.raises(ValueError, match="do not fit this model"):
        run(regression, "mlp", {**hp, "width_l0": 17, "width": [17, 16]}, resume=state)
    with pytest.raises(ValueError, match="format"):
        TrainState.from_dict({**state.to_dict(), "format": 99})
