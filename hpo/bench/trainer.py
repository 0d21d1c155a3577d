"""LeNet-5 on Fashion-MNIST at batch 64: the seeds' DataLoader loop against the hpo trainer (eager,
and with the step in a CUDA graph), and graph against eager from the same weights and seed.

The DataLoader loop is the seeds' (and Optuna's PyTorch example's): torchvision's Dataset with
``ToTensor`` and ``Normalize`` per sample, ``DataLoader(shuffle=True)``, Adam. The hpo trainer is
``hpo.training.trainer.train``: the data on the device, batches by index, the step in a CUDA graph on a GPU;
its epochs include a validation pass (the loop's do not).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from typing import Any

import torch

from hpo.bench.data import BenchData
from hpo.bench.ops import LENET5
from hpo.data.dataset import Dataset
from hpo.data.images import SOURCES, load_image_dataset
from hpo.nn.models import build_model
from hpo.spec.hyperparams import resolve
from hpo.spec.schema import parse_spec
from hpo.training.trainer import evaluate, train

BATCH = 64
VAL_IMAGES = 1000

# Graph against eager: the training features a captured step must reproduce. LeNet-5 without
# dropout unless the case adds it, so that only the named feature differs.
CASES: dict[str, dict[str, Any]] = {
    "Adam": {"optimizer": "Adam", "lr": 1e-3},
    "RMSprop + exponential": {"optimizer": "RMSprop", "lr": 1e-3, "scheduler": "exponential", "lr_decay": 0.8},
    "SGD + momentum": {"optimizer": "SGD", "lr": 0.05, "momentum": 0.9},
    "Adam + plateau": {"optimizer": "Adam", "lr": 3e-3, "scheduler": "plateau", "plateau_patience": 0},
    "batch-norm": {"optimizer": "Adam", "lr": 1e-3, "batch_norm": True},
    "dropout": {"optimizer": "Adam", "lr": 1e-3, "conv_dropout": 0.3, "dropout": 0.3},
    "augmentation": {"optimizer": "Adam", "lr": 1e-3, "augment": True},
    "early stopping": {"optimizer": "Adam", "lr": 1e-2, "early_stopping": 1},
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_dataset(data: BenchData, device: torch.device, *, train_images: int | None, test_images: int | None) -> Dataset:
    """The bench's Fashion-MNIST (or synthetic) set on ``device``: the first ``train_images`` to
    train on, the first 1,000 of them to validate on each epoch, the first ``test_images`` of the
    test set."""
    spec = parse_spec({"name": "bench", "model": "cnn", "data": {"source": "fashion_mnist"}})
    full = load_image_dataset(spec, data_dir=str(data.folder))
    n = min(train_images or len(full.x), len(full.x))
    t = min(test_images or len(full.x_test), len(full.x_test))
    return replace(full, train_idx=torch.arange(n), val_idx=torch.arange(min(VAL_IMAGES, n)),
                   x_test=full.x_test[:t], y_test=full.y_test[:t]).to(device)


def _rates(epoch_s: list[float]) -> dict[str, float]:
    steady = epoch_s[1:] or epoch_s  # the first epoch holds cuDNN autotuning and the graph capture
    s = statistics.median(steady)
    return {"s_per_epoch": s, "model_epochs_per_s": 1 / s, "first_epoch_s": epoch_s[0]}


def dataloader_loop(data: BenchData, test: Dataset, *, device: torch.device, epochs: int, images: int) -> dict:
    """The seeds' loop for ``epochs`` over the first ``images`` training images."""
    from torchvision import datasets, transforms

    src = SOURCES["fashion_mnist"]
    ds = datasets.FashionMNIST(str(data.root), train=True, download=False, transform=transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((src.mean,), (src.std,))]))
    if images < len(ds):
        ds = torch.utils.data.Subset(ds, range(images))
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True)
    hp = resolve(LENET5)
    torch.manual_seed(0)
    model = build_model("cnn", hp, in_shape=(1, 28, 28), out_features=10).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    times = []
    for _ in range(epochs):
        sync(device)
        start = time.perf_counter()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        sync(device)
        times.append(time.perf_counter() - start)
    return {"epoch_s": times, **_rates(times), "path": "DataLoader",
            "test_accuracy": evaluate(model, "classification", test.x_test, test.y_test)["accuracy"]}


def _timed_train(model: torch.nn.Module, data: Dataset, hp: dict, *, cuda_graph: bool) -> dict:
    stamps: list[float] = []
    sync(data.x.device)
    start = time.perf_counter()
    result = train(model, data, hp, seed=0, cuda_graph=cuda_graph,
                   on_epoch=lambda epoch, stats: stamps.append(time.perf_counter()))
    times = [b - a for a, b in zip([start, *stamps], stamps)]
    return {"epoch_s": times, **_rates(times), "path": result.path, "path_reason": result.path_reason,
            "train_loss": result.history[-1]["train_loss"], "val_accuracy": result.history[-1]["val_accuracy"],
            "epochs_run": result.epochs_run,
            "test_accuracy": evaluate(model, "classification", data.x_test, data.y_test)["accuracy"]}


def hpo_trainer(data: Dataset, *, epochs: int, cuda_graph: bool) -> dict:
    """``hpo.training.trainer.train`` with the loop's LeNet-5 settings, from the same initial weights."""
    hp = resolve({**LENET5, "epochs": epochs, "batch_size": BATCH})
    torch.manual_seed(0)
    model = build_model("cnn", hp, in_shape=data.in_shape, out_features=10).to(data.x.device)
    return _timed_train(model, data, hp, cuda_graph=cuda_graph)


def graph_vs_eager(data: Dataset, *, epochs: int, case: dict[str, Any]) -> dict:
    """One case trained three times from the same initial weights and batch-order seed: eager,
    eager again (the run-to-run spread), and with the step in a CUDA graph (on CUDA only)."""
    hp = resolve({**LENET5, "conv_dropout": 0.0, "dropout": 0.0, **case, "epochs": epochs, "batch_size": BATCH})
    torch.manual_seed(0)
    model = build_model("cnn", hp, in_shape=data.in_shape, out_features=10).to(data.x.device)
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    def run(cuda_graph: bool) -> dict:
        model.load_state_dict(initial)
        torch.manual_seed(1)  # dropout and augmentation draw from the global generator
        return _timed_train(model, data, hp, cuda_graph=cuda_graph)

    runs = {"eager": run(False), "eager_again": run(False)}
    runs["graph"] = run(True) if data.x.device.type == "cuda" else None
    return runs
