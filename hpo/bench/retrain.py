"""The 10-fold retrain of the seed's LeNet-5: the K models stacked (``hpo.training.stacked``: torch.func
vmap, the step in one CUDA graph) against the sequential path (``hpo.training.trainer.train`` per fold), from
the same initial weights and fold seeds, as ``hpo retrain`` runs them."""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from hpo.bench.data import BenchData
from hpo.bench.trainer import sync
from hpo.data.sources import load_dataset
from hpo.data.splits import split_folds
from hpo.retrain import ensemble
from hpo.spec.hyperparams import resolve
from hpo.spec.schema import find_spec_file, load_spec_file
from hpo.training.folds import fold_models
from hpo.training.stacked import Fold, train_stacked
from hpo.training.trainer import predict, train

# A good configuration of the seed's LeNet-5 space (the seed's best trial was Adam, lr ~1e-3).
SEED_HP = dict(batch_size=64, lr=1e-3, weight_decay=1e-4, optimizer="Adam", conv_dropout=0.2, dropout=0.2)


def stacked_vs_sequential(data: BenchData, *, device: torch.device, folds: int, images: int | None,
                          stacked_epochs: int, sequential_epochs: int) -> dict:
    """Both paths on K folds of the first ``images`` training images (all when None).

    The sequential path may run fewer epochs per fold than the stacked one: its rate per
    model-epoch does not depend on how many, and on a GPU it is the slow side.

    Returns:
        ``{"stacked": {...}, "sequential": {...}}``, each with seconds, model-epochs/s, path and
        the test accuracy of the best fold (and, stacked, of the majority and soft votes).
    """
    spec = load_spec_file(find_spec_file("fmnist"))
    spec = spec.with_data(replace(spec.data, train_subset=None, val_subset=None))
    full = load_dataset(spec, data_dir=str(data.folder))
    if images and images < len(full.x):
        keep = torch.randperm(len(full.x), generator=torch.Generator().manual_seed(0))[:images]
        full = replace(full, x=full.x[keep], y=full.y[keep], x_test=full.x_test[:images], y_test=full.y_test[:images])
    ds = full.to(device)
    splits = split_folds(len(ds.x), folds=folds, seed=spec.seed, labels=ds.y.cpu().numpy())
    fold_list = [Fold(train_idx=torch.from_numpy(t).to(device), val_idx=torch.from_numpy(v).to(device), seed=1000 + i)
                 for i, (t, v) in enumerate(splits)]
    seeds = [f.seed for f in fold_list]
    out = {}
    for name, epochs in (("stacked", stacked_epochs), ("sequential", sequential_epochs)):
        hp = resolve({**spec.fixed, **SEED_HP, "epochs": epochs})
        models = fold_models(spec.family_of(hp), hp, ds, seeds=seeds, device=device)
        sync(device)
        start = time.perf_counter()
        if name == "stacked":
            outcome = train_stacked(models, ds, hp, folds=fold_list)
            results = outcome.results
            path = "stacked, cuda_graph" if outcome.cuda_graph else "stacked, eager"
            notes = outcome.notes
        else:
            results = [train(m, ds, hp, seed=f.seed, train_idx=f.train_idx, val_idx=f.val_idx)
                       for m, f in zip(models, fold_list)]
            path = "sequential, " + ", ".join(sorted({r.path for r in results}))
            notes = sorted({r.path_reason for r in results if r.path_reason})
        sync(device)
        seconds = time.perf_counter() - start
        model_epochs = sum(r.epochs_run for r in results)
        outputs = torch.stack([predict(m, ds.x_test) for m in models])
        val_acc = [r.metrics["val_accuracy"] for r in results]
        best = max(range(folds), key=val_acc.__getitem__)
        y = ds.y_test
        out[name] = {
            "seconds": seconds, "epochs": epochs, "model_epochs": model_epochs,
            "model_epochs_per_s": model_epochs / seconds, "s_per_epoch": seconds / epochs,
            "path": path, "notes": notes,
            "best_fold": (outputs[best].argmax(1) == y).float().mean().item(),
            "majority_vote": (ensemble.majority_vote(outputs, tie_breaker=best) == y).float().mean().item(),
            "soft_vote": (ensemble.soft_vote(outputs).argmax(1) == y).float().mean().item(),
        }
    return out
