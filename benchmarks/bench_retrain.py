"""K-fold retrain speed: the seed's LeNet-5 on Fashion-MNIST, K models stacked (torch.func vmap,
CUDA graph) against the sequential path (``hpo.train.train`` per fold), in the same run.

    python benchmarks/bench_retrain.py --device cuda            # 10 folds x 30 epochs, all 60k images
    python benchmarks/bench_retrain.py --device cpu --subset 2000 --epochs 2   # smoke check

Prints model-epochs/s of both paths and their ratio (target on one H100: >= 10 model-epochs/s
stacked), and the test accuracy of the best fold, the majority vote and the soft vote.
The sequential path runs ``--sequential-epochs`` epochs per fold (its rate per model-epoch does
not depend on how many), so a GPU run does not spend minutes on the slow path.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hpo import ensemble  # noqa: E402
from hpo.data import load_dataset  # noqa: E402
from hpo.hyperparams import resolve  # noqa: E402
from hpo.retrain import fold_models, split_folds  # noqa: E402
from hpo.spec import load_spec_file  # noqa: E402
from hpo.stacked import Fold, train_stacked  # noqa: E402
from hpo.train import predict, train  # noqa: E402

STUDIES = Path(__file__).resolve().parent.parent / "studies"
# A good configuration of the seed's LeNet-5 space (the seed's best trial was Adam, lr ~1e-3).
SEED_HP = dict(batch_size=64, lr=1e-3, weight_decay=1e-4, optimizer="Adam", conv_dropout=0.2, dropout=0.2)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--sequential-epochs", type=int, default=3)
    parser.add_argument("--subset", type=int, default=None, help="Use only N training images (smoke runs).")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)

    spec = load_spec_file(STUDIES / "fmnist.yaml")
    spec = spec.with_data(replace(spec.data, train_subset=None, val_subset=None))
    data = load_dataset(spec, data_dir=args.data_dir)
    if args.subset:
        keep = torch.randperm(len(data.x), generator=torch.Generator().manual_seed(0))[:args.subset]
        data = replace(data, x=data.x[keep], y=data.y[keep], x_test=data.x_test[:args.subset],
                       y_test=data.y_test[:args.subset])
    data = data.to(device)
    hp = resolve({**spec.fixed, **SEED_HP, "epochs": args.epochs})
    splits = split_folds(data, folds=args.folds, seed=spec.seed)
    folds = [Fold(train_idx=torch.from_numpy(t).to(device), val_idx=torch.from_numpy(v).to(device), seed=1000 + i)
             for i, (t, v) in enumerate(splits)]
    seeds = [f.seed for f in folds]
    print(f"{args.folds} folds of {len(data.x)} images, LeNet-5, batch {hp['batch_size']}, on {device} "
          f"({torch.get_num_threads()} threads)")

    models = fold_models(spec, hp, data, seeds=seeds, device=device)
    sync(device)
    start = time.perf_counter()
    outcome = train_stacked(models, data, hp, folds=folds)
    sync(device)
    stacked_s = time.perf_counter() - start
    stacked_rate = sum(r.epochs_run for r in outcome.results) / stacked_s
    print(f"stacked:    {args.folds} x {args.epochs} epochs in {stacked_s:.1f}s = {stacked_rate:.2f} model-epochs/s"
          f" (CUDA graph: {outcome.cuda_graph}{'; ' + '; '.join(outcome.notes) if outcome.notes else ''})")

    seq_hp = {**hp, "epochs": args.sequential_epochs}
    seq_models = fold_models(spec, seq_hp, data, seeds=seeds, device=device)
    sync(device)
    start = time.perf_counter()
    paths = set()
    for model, f in zip(seq_models, folds):
        paths.add(train(model, data, seq_hp, seed=f.seed, train_idx=f.train_idx, val_idx=f.val_idx).path)
    sync(device)
    seq_s = time.perf_counter() - start
    seq_rate = args.folds * args.sequential_epochs / seq_s
    print(f"sequential: {args.folds} x {args.sequential_epochs} epochs in {seq_s:.1f}s = {seq_rate:.2f} model-epochs/s"
          f" (path: {', '.join(sorted(paths))})")
    print(f"ratio stacked / sequential: {stacked_rate / seq_rate:.1f}x")

    outputs = torch.stack([predict(m, data.x_test) for m in models])
    val_acc = [r.metrics["val_accuracy"] for r in outcome.results]
    best = max(range(len(models)), key=val_acc.__getitem__)
    y = data.y_test
    accuracy = {
        "best fold": (outputs[best].argmax(1) == y).float().mean().item(),
        "majority vote": (ensemble.majority_vote(outputs, tie_breaker=best) == y).float().mean().item(),
        "soft vote": (ensemble.soft_vote(outputs).argmax(1) == y).float().mean().item(),
    }
    print("test accuracy (stacked models): " + ", ".join(f"{k} {v:.4f}" for k, v in accuracy.items()))


if __name__ == "__main__":
    main()
