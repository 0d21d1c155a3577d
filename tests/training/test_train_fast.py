"""The trainer's fast path in its CPU form: path selection and fallback, the warm-up/restore that
precedes CUDA-graph capture, capturable optimizers with schedulers, augmentation, and a short
Fashion-MNIST study through the real CLI."""

import time
import warnings
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from conftest import STUDIES, run_hpo
from test_images import write_idx_set

from hpo.data.images import load_image_dataset
from hpo.errors import TrainingError
from hpo.nn.models import build_model
from hpo.spec.hyperparams import resolve
from hpo.spec.schema import parse_spec
from hpo.training import trainer as train_module
from hpo.training.trainer import (
    graph_problem,
    make_optimizer,
    make_scheduler,
    restore,
    snapshot,
    train,
    warm_up,
)

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
SMALL_CNN = {"n_conv": 2, "filters": [4, 8], "kernel_size": 5, "padding": 2, "n_dense": 1, "dense_width": 16,
             "epochs": 2, "batch_size": 16}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("idx")
    write_idx_set(folder, n_train=100, n_test=20)
    spec = parse_spec({"name": "img", "model": "cnn", "data": {"source": "fashion_mnist"}})
    return load_image_dataset(spec, data_dir=str(folder))


def fit(data, *, seed=0, **hp):
    hp = resolve({**SMALL_CNN, **hp})
    torch.manual_seed(seed)
    model = build_model("cnn", hp, in_shape=data.in_shape, out_features=data.out_features)
    return model, train(model, data, hp, seed=seed)


def test_cpu_runs_eager_and_says_why(images):
    _, result = fit(images)
    assert result.path == "eager" and result.path_reason.startswith("CUDA graphs need a CUDA device")
    assert result.epochs_run == 2 and 0 <= result.metrics["val_accuracy"] <= 1
    hp = resolve(SMALL_CNN)
    model = build_model("cnn", hp, in_shape=images.in_shape, out_features=10)
    assert train(model, images, hp, seed=0, cuda_graph=False).path_reason == "cuda_graph=False"


def test_graph_plan_on_a_cuda_device():
    cuda = torch.device("cuda", 0)  # only the decision: no CUDA needed
    assert graph_problem(cuda, resolve({"optimizer": "Adam", "scheduler": "plateau"})) == ""
    assert graph_problem(cuda, resolve({"optimizer": "RMSprop", "scheduler": "exponential"})) == ""
    assert graph_problem(cuda, resolve({"optimizer": "SGD", "scheduler": "none"})) == ""
    assert "SGD reads its lr on the host" in graph_problem(cuda, resolve({"optimizer": "SGD", "scheduler": "plateau"}))


@pytest.mark.parametrize("optimizer", ["Adam", "SGD", "RMSprop"])
def test_warm_up_then_restore_equals_a_fresh_start(images, optimizer):
    """What capture does before the first epoch must leave no trace: weights, batch-norm statistics
    and optimizer state are put back, so training continues exactly as from scratch."""
    hp = resolve({**SMALL_CNN, "optimizer": optimizer, "momentum": 0.9, "weight_decay": 1e-3, "batch_norm": True})
    x, y = images.x[:16], images.y[:16]

    def run(with_warm_up: bool):
        torch.manual_seed(0)
        model = build_model("cnn", hp, in_shape=images.in_shape, out_features=10)
        opt = make_optimizer(model.parameters(), hp)

        def step(xb, yb):
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()

        if with_warm_up:
            saved = snapshot(model)
            warm_up(step, images.x[16:32], images.y[16:32], opt)
            assert not torch.equal(saved["0.weight"], model.state_dict()["0.weight"])
            restore(model, saved, opt)
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            step(x, y)
        return model.state_dict()

    fresh, warmed = run(False), run(True)
    for name in fresh:
        torch.testing.assert_close(warmed[name], fresh[name], msg=name)


@pytest.mark.parametrize("optimizer", ["Adam", "RMSprop"])
def test_capturable_optimizer_keeps_its_lr_tensor_under_a_scheduler(optimizer):
    model = torch.nn.Linear(3, 1)
    hp = resolve({"optimizer": optimizer, "lr": 0.1, "scheduler": "exponential", "lr_decay": 0.5})
    opt = make_optimizer(model.parameters(), hp, capturable=True)
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and opt.param_groups[0]["capturable"]
    scheduler = make_scheduler(opt, hp)
    with pytest.warns(UserWarning):  # stepping the scheduler without an optimizer step: fine here
        scheduler.step()
    # the very tensor a captured graph reads was updated in place
    assert opt.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(0.05)


def test_partial_last_batch_is_kept(images):
    """Same batches as before the fast path: 80 training images at batch 32 give 32, 32, 16."""
    seen = []
    hp = resolve({**SMALL_CNN, "batch_size": 32, "epochs": 1})
    model = build_model("cnn", hp, in_shape=images.in_shape, out_features=10)
    handle = model.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])) if m.training else None)
    train(model, images, hp, seed=0)
    handle.remove()
    assert seen == [32, 32, 16]


def test_augmentation_trains_on_images_and_is_refused_elsewhere(images):
    _, plain = fit(images, epochs=1)
    _, augmented = fit(images, epochs=1, augment=True)
    assert augmented.history[0]["train_loss"] != plain.history[0]["train_loss"]
    flat = replace(images, x=images.x.flatten(1), in_shape=(784,))
    hp = resolve({"n_layers": 1, "width": 8, "epochs": 1, "augment": True})
    with pytest.raises(TrainingError, match=r"augment: true needs image data .* got input shape \(784,\)"):
        train(build_model("mlp", hp, in_shape=(784,), out_features=10), flat, hp, seed=0)


@pytest.mark.slow
@pytest.mark.skipif(not DEBIAN.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_short_fmnist_study_with_pruning(tmp_path, cli_env):
    """The shipped LeNet-5 study on a 2,000-image subset, few epochs, through the real CLI."""
    raw = yaml.safe_load((STUDIES / "fmnist.yaml").read_text())
    raw["data"].update(train_subset=2000, val_subset=500)
    raw["space"]["epochs"] = {"int": [3, 4]}
    raw["space"]["batch_size"] = {"int": [128, 256]}
    raw["sampler"] = {"kind": "tpe", "n_startup_trials": 3}
    raw["pruner"] = {"kind": "median", "n_startup_trials": 2, "n_warmup_steps": 0}
    raw["budget"] = {"n_trials": 7}
    spec = tmp_path / "fmnist.yaml"
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    run_hpo("create-study", str(spec), env=cli_env, check=0)
    start = time.perf_counter()
    proc = run_hpo("worker", "--study", "fmnist", "--data-dir", str(DEBIAN), env=cli_env, check=0)
    assert time.perf_counter() - start < 180
    assert "Number of finished trials: 7" in proc.stdout

    study = optuna.load_study(study_name="fmnist", storage=cli_env["HPO_STORAGE"])
    states = [t.state.name for t in study.trials]
    assert states.count("PRUNED") >= 1 and states.count("COMPLETE") >= 2, states
    best = study.best_trial
    assert best.value > 0.5  # LeNet-5 learns something in 3-4 epochs on 2,000 images
    assert best.user_attrs["epochs_run"] == best.params["epochs"]
    for t in study.trials:
        if t.state.name == "PRUNED":
            assert t.user_attrs["epochs_run"] < t.params["epochs"]
        if t.state.name == "COMPLETE" and "train_path" in t.user_attrs:
            assert t.user_attrs["train_path"] == "eager"
        assert ("momentum" in t.params) == (t.params["optimizer"] != "Adam")


def fake_capture(model):
    """Stands in for CUDA-graph capture on the CPU: 'replay' runs the step again. A real graph
    overwrites the gradients it allocated at capture, so the stand-in clears them first."""
    def capture(fn):
        def replay():
            model.zero_grad(set_to_none=True)
            fn()
        return replay
    return capture


def test_graph_path_plumbing_gives_the_eager_results(images, monkeypatch):
    """The graph path's warm-up, restore, static buffers (full and last partial batch) and replay
    loop, run on the CPU with a stand-in for capture, train exactly as the eager loop does."""
    hp = resolve({**SMALL_CNN, "optimizer": "SGD", "momentum": 0.9, "weight_decay": 1e-3, "batch_norm": True,
                  "batch_size": 24, "epochs": 3})  # 80 images: batches of 24, 24, 24, 8

    def run(graph: bool):
        torch.manual_seed(0)
        model = build_model("cnn", hp, in_shape=images.in_shape, out_features=10)
        if graph:
            monkeypatch.setattr(train_module, "graph_problem", lambda device, hp: "")
            monkeypatch.setattr(train_module, "_cuda_capture", fake_capture(model))
        result = train(model, images, hp, seed=0, cuda_graph=graph)
        monkeypatch.undo()
        return model, result

    (eager_model, eager), (graph_model, graphed) = run(False), run(True)
    assert graphed.path == "cuda_graph" and graphed.path_reason == "" and eager.path == "eager"
    assert [h["train_loss"] for h in graphed.history] == pytest.approx([h["train_loss"] for h in eager.history])
    for (name, a), b in zip(eager_model.state_dict().items(), graph_model.state_dict().values()):
        torch.testing.assert_close(b, a, msg=name)


def test_failed_capture_falls_back_to_eager_and_says_why(images, monkeypatch):
    def refuse(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    hp = resolve({**SMALL_CNN, "optimizer": "SGD", "momentum": 0.9})
    torch.manual_seed(0)
    reference = build_model("cnn", hp, in_shape=images.in_shape, out_features=10)
    expected = train(reference, images, hp, seed=0).history
    torch.manual_seed(0)
    model = build_model("cnn", hp, in_shape=images.in_shape, out_features=10)
    monkeypatch.setattr(train_module, "graph_problem", lambda device, hp: "")
    monkeypatch.setattr(train_module, "_cuda_capture", refuse)
    result = train(model, images, hp, seed=0)
    assert result.path == "eager"
    assert result.path_reason == "capture failed: RuntimeError: operation not permitted when stream is capturing"
    # the warm-up steps taken before the failed capture were undone
    assert [h["train_loss"] for h in result.history] == pytest.approx([h["train_loss"] for h in expected])


def test_graph_path_with_a_scheduler_gives_no_scheduler_order_warning(images, monkeypatch):
    """On CUDA every replay runs the captured optimizer step without running Python, so torch's
    scheduler learns of optimizer.step() only from the capture itself. The stand-in does what CUDA
    does: the step's Python runs once at capture, and replays bypass the Python-level step."""
    optimizers = []

    def recording(*args, **kwargs):
        optimizers.append(make_optimizer(*args, **kwargs))
        return optimizers[-1]

    def capture(fn):
        fn()  # capture runs the step's Python once (its effect is undone by the restore that follows)
        optimizer = optimizers[-1]

        def replay():
            wrapper = optimizer.__dict__.pop("step", None)  # no Python on replay: no scheduler bookkeeping
            try:
                fn()
            finally:
                if wrapper is not None:
                    optimizer.step = wrapper
        return replay

    monkeypatch.setattr(train_module, "make_optimizer", recording)
    monkeypatch.setattr(train_module, "graph_problem", lambda device, hp: "")
    monkeypatch.setattr(train_module, "_cuda_capture", capture)
    hp = resolve({**SMALL_CNN, "optimizer": "SGD", "lr": 0.01, "scheduler": "exponential", "lr_decay": 0.5})
    torch.manual_seed(0)
    model = build_model("cnn", hp, in_shape=images.in_shape, out_features=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(model, images, hp, seed=0)
    assert result.path == "cuda_graph"
    assert [str(w.message) for w in caught if "lr_scheduler.step()" in str(w.message)] == []
    assert [h["lr"] for h in result.history] == pytest.approx([0.01, 0.005])
