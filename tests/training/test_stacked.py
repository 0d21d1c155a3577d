"""K models trained stacked (torch.func) give the sequential trainer's results on a tiny problem."""

import pytest
import torch
from plugin_package import example_installed  # noqa: F401 (a fixture)

from hpo.data.dataset import Dataset
from hpo.errors import TrainingError
from hpo.nn.models import build_model
from hpo.spec.hyperparams import resolve
from hpo.training.stacked import Fold, StackedOptimizer, stack_problem, train_stacked
from hpo.training.trainer import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_data(task: str, n: int = 53, in_shape: tuple[int, ...] = (3,)) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *in_shape, generator=g)
    flat = x.reshape(n, -1)
    if task == "classification":
        y = (flat[:, 0] > 0).long() + (flat[:, 1] > 0.5).long()
        out = 3
    else:
        y = 2 * flat[:, :1] + flat[:, 1:2] ** 2
        out = 1
    idx = torch.arange(n)
    return Dataset(task=task, x=x, y=y, train_idx=idx[:40], val_idx=idx[40:], x_test=x[:8], y_test=y[:8],
                   in_shape=in_shape, out_features=out)


def make_folds(n: int, k: int) -> list[Fold]:
    # n not divisible by k: uneven folds exercise the padding
    chunks = torch.tensor_split(torch.randperm(n, generator=torch.Generator().manual_seed(1)), k)
    return [Fold(train_idx=torch.cat([c for j, c in enumerate(chunks) if j != i]).sort().values,
                 val_idx=chunks[i].sort().values, seed=100 + i) for i in range(k)]


def fresh_models(family: str, hp: dict, data: Dataset, k: int) -> list[torch.nn.Module]:
    models = []
    for i in range(k):
        torch.manual_seed(i)
        models.append(build_model(family, hp, in_shape=data.in_shape, out_features=data.out_features))
    return models


def both_paths(family: str, hp: dict, data: Dataset, folds: list[Fold]):
    sequential = fresh_models(family, hp, data, len(folds))
    seq = [train(m, data, hp, seed=f.seed, train_idx=f.train_idx, val_idx=f.val_idx) for m, f in zip(sequential, folds)]
    stacked = fresh_models(family, hp, data, len(folds))
    outcome = train_stacked(stacked, data, hp, folds=folds)
    return sequential, seq, stacked, outcome


def assert_same(sequential, seq, stacked, outcome, *, atol: float):
    assert [r.epochs_run for r in outcome.results] == [r.epochs_run for r in seq]
    assert [r.stopped_early for r in outcome.results] == [r.stopped_early for r in seq]
    for a, b in zip(sequential, stacked):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.allclose(p.float(), q.float(), atol=atol), name
    for ra, rb in zip(seq, outcome.results):
        for key, value in ra.metrics.items():
            assert rb.metrics[key] == pytest.approx(value, rel=1e-3, abs=1e-5), key
        assert [h["lr"] for h in rb.history] == pytest.approx([h["lr"] for h in ra.history])
        assert [h["train_loss"] for h in rb.history] == pytest.approx([h["train_loss"] for h in ra.history], rel=1e-3)


@pytest.mark.parametrize("optimizer,scheduler,task", [
    ("Adam", "plateau", "regression"),
    ("SGD", "exponential", "regression"),
    ("RMSprop", "none", "classification"),
    ("Adam", "none", "classification"),
])
def test_stacked_matches_sequential_mlp(optimizer, scheduler, task):
    data = tiny_data(task)
    hp = resolve(dict(n_layers=2, width=16, optimizer=optimizer, momentum=0.5, lr=1e-2, weight_decay=1e-3,
                      batch_size=8, epochs=10, early_stopping=3, scheduler=scheduler, plateau_patience=1))
    assert_same(*both_paths("mlp", hp, data, make_folds(len(data.x), 4)), atol=1e-4)


def test_stacked_matches_sequential_cnn_with_batch_norm():
    data = tiny_data("classification", n=48, in_shape=(1, 12, 12))
    hp = resolve(dict(n_conv=2, filters=[4, 6], kernel_size=3, padding=1, batch_norm=True, n_dense=1,
                      dense_width=[16], batch_size=12, epochs=3, optimizer="Adam", lr=3e-3))
    sequential, seq, stacked, outcome = both_paths("cnn", hp, data, make_folds(len(data.x), 4))  # equal folds
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in stacked[0].modules())
    assert_same(sequential, seq, stacked, outcome, atol=1e-4)


def test_early_stopped_models_freeze_while_the_others_go_on():
    data = tiny_data("regression")
    hp = resolve(dict(n_layers=1, width=8, optimizer="SGD", momentum=0.9, lr=0.05, batch_size=8, epochs=15, early_stopping=1))
    sequential, seq, stacked, outcome = both_paths("mlp", hp, data, make_folds(len(data.x), 3))
    runs = [r.epochs_run for r in outcome.results]
    assert min(runs) < max(runs), "the test needs models that stop at different epochs"
    assert_same(sequential, seq, stacked, outcome, atol=1e-4)


def test_optimizer_leaves_inactive_models_untouched():
    params = {"w": torch.ones(3, 4, requires_grad=True)}
    for name in ("Adam", "SGD", "RMSprop"):
        opt = StackedOptimizer(params, resolve(dict(optimizer=name, momentum=0.9, weight_decay=0.1, lr=0.1)), 3)
        before = params["w"].detach().clone()
        opt.update(params, {"w": torch.full((3, 4), 2.0)}, torch.tensor([True, False, True]))
        after = params["w"].detach()
        assert torch.equal(after[1], before[1]), name
        assert not torch.equal(after[0], before[0]), name
        assert opt.steps.tolist() == [1.0, 0.0, 1.0]


def test_cuda_graph_request_runs_eagerly_on_cpu():
    data = tiny_data("regression")
    hp = resolve(dict(n_layers=1, width=8, batch_size=16, epochs=2))
    outcome = train_stacked(fresh_models("mlp", hp, data, 2), data, hp, folds=make_folds(len(data.x), 2),
                            cuda_graph=True)
    assert outcome.cuda_graph is False and outcome.notes == []
    assert all(r.epochs_run == 2 for r in outcome.results)


def test_models_of_different_architectures_are_refused():
    data = tiny_data("regression")
    models = [build_model("mlp", resolve(dict(n_layers=1, width=w)), in_shape=(3,), out_features=1) for w in (4, 8)]
    assert stack_problem(models) == "the models differ in architecture"
    assert stack_problem(models[:1]) == "a single model"
    with pytest.raises(TrainingError, match="differ in architecture"):
        train_stacked(models, data, resolve({}), folds=make_folds(len(data.x), 2))


def test_diverging_fold_is_a_training_error():
    data = tiny_data("regression")
    hp = resolve(dict(n_layers=1, width=8, optimizer="SGD", lr=1e6, batch_size=8, epochs=5))
    with pytest.raises(TrainingError, match=r"fold \d: training loss became"):
        train_stacked(fresh_models("mlp", hp, data, 2), data, hp, folds=make_folds(len(data.x), 2))


@pytest.mark.usefixtures("example_installed")
def test_stacked_matches_sequential_for_a_plugin_family_with_buffers():
    from hpo.nn.registry import resolved

    data = tiny_data("classification", n=48, in_shape=(3, 8, 8))
    hp = resolved("resnet_small", dict(blocks=2, width=[4, 6], dropout=0.0, batch_size=12, epochs=3, lr=3e-3))
    sequential, seq, stacked, outcome = both_paths("resnet_small", hp, data, make_folds(len(data.x), 4))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in stacked[0].modules())
    assert_same(sequential, seq, stacked, outcome, atol=1e-4)
