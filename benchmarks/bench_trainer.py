"""LeNet-5 on Fashion-MNIST at batch 64, two ways in one run: (a) the seeds' torchvision
Dataset + ToTensor + DataLoader loop, (b) hpo's trainer (data on the device, batches by index,
CUDA graph on a GPU). Prints seconds per epoch, model-epochs per second, test accuracy, the ratio.

    python benchmarks/bench_trainer.py DATA_ROOT                       # GPU, 60k images, 5 epochs
    python benchmarks/bench_trainer.py DATA_ROOT --device cpu --subset 2000 --epochs 2   # smoke

DATA_ROOT holds the four IDX files (gz or not) or is a torchvision root (DATA_ROOT/FashionMNIST/raw).
Both sides train the same architecture (hpo's LeNet-5) with the same optimizer settings; hpo's
epochs include a validation pass over 1,000 images, the baseline's none.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hpo.hyperparams import resolve  # noqa: E402
from hpo.images import SOURCES, find_idx_files, load_image_dataset  # noqa: E402
from hpo.models import build_model  # noqa: E402
from hpo.spec import parse_spec  # noqa: E402
from hpo.train import evaluate, train  # noqa: E402

# The anchors' LeNet-5 settings (../shared/anchors/gpu_anchor.py), so the numbers compare.
HP = {"n_conv": 2, "filters": [6, 16], "kernel_size": 5, "padding": 2, "pooling": "max", "n_dense": 2,
      "dense_width": [120, 84], "conv_dropout": 0.41, "dropout": 0.24, "optimizer": "Adam", "lr": 2.14e-3,
      "weight_decay": 5.5e-5}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def torchvision_root(files: dict[str, Path], scratch: Path) -> str:
    """A torchvision root with the raw files uncompressed, as torchvision.datasets.FashionMNIST wants."""
    raw = scratch / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for path in files.values():
        target = raw / path.name.removesuffix(".gz")
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            shutil.copyfile(path, target)
    return str(scratch)


def baseline(root: str, *, device: torch.device, epochs: int, batch: int, subset: int | None, x_test, y_test) -> dict:
    from torchvision import datasets, transforms

    src = SOURCES["fashion_mnist"]
    ds = datasets.FashionMNIST(root, train=True, download=False, transform=transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((src.mean,), (src.std,))]))
    if subset:
        ds = torch.utils.data.Subset(ds, range(subset))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True)
    hp = resolve(HP)
    torch.manual_seed(0)
    model = build_model("cnn", hp, in_shape=(1, 28, 28), out_features=10).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    times = []
    for _ in range(epochs):
        sync(device)
        t = time.perf_counter()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        sync(device)
        times.append(time.perf_counter() - t)
    return {"epoch_s": times, "test_accuracy": evaluate(model, "classification", x_test, y_test)["accuracy"],
            "path": "DataLoader"}


def hpo_trainer(data, *, device: torch.device, epochs: int, batch: int) -> dict:
    hp = resolve({**HP, "epochs": epochs, "batch_size": batch})
    torch.manual_seed(0)
    model = build_model("cnn", hp, in_shape=data.in_shape, out_features=10).to(device)
    stamps = []
    sync(device)
    start = time.perf_counter()
    result = train(model, data, hp, seed=0, on_epoch=lambda epoch, stats: stamps.append(time.perf_counter()))
    times = [b - a for a, b in zip([start, *stamps], stamps)]
    return {"epoch_s": times, "test_accuracy": evaluate(model, "classification", data.x_test, data.y_test)["accuracy"],
            "path": result.path, "path_reason": result.path_reason}


def summary(name: str, r: dict) -> str:
    steady = r["epoch_s"][1:] or r["epoch_s"]
    r["s_per_epoch"] = statistics.median(steady)
    r["model_epochs_per_s"] = 1.0 / r["s_per_epoch"]
    return (f"{name:<28} {r['s_per_epoch']:>9.3f} {r['model_epochs_per_s']:>10.2f} {r['epoch_s'][0]:>10.3f} "
            f"{r['test_accuracy']:>9.4f}  {r['path']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="folder with the Fashion-MNIST IDX files, or a torchvision root")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--subset", type=int, default=None, help="train on the first N images only (smoke runs)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="write the results here (default: $OUT/bench_trainer.json if $OUT is set)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    spec = parse_spec({"name": "bench", "model": "cnn", "data": {"source": "fashion_mnist"}})
    data = load_image_dataset(spec, data_dir=args.root)
    n = args.subset or len(data.x)
    data = replace(data, train_idx=torch.arange(n), val_idx=torch.arange(min(1000, len(data.x)))).to(device)
    files = find_idx_files("fashion_mnist", data_dir=args.root)

    with tempfile.TemporaryDirectory() as scratch:
        root = torchvision_root(files, Path(scratch))
        base = baseline(root, device=device, epochs=args.epochs, batch=args.batch, subset=args.subset,
                        x_test=data.x_test, y_test=data.y_test)
    fast = hpo_trainer(data, device=device, epochs=args.epochs, batch=args.batch)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"LeNet-5, Fashion-MNIST {n} training images, batch {args.batch}, {args.epochs} epochs, {name}, torch {torch.__version__}")
    print(f"{'way':<28} {'s/epoch':>9} {'m-ep/s':>10} {'1st epoch':>10} {'test acc':>9}  path")
    print(summary("(a) DataLoader baseline", base))
    print(summary("(b) hpo trainer", fast))
    ratio = base["s_per_epoch"] / fast["s_per_epoch"]
    print(f"speed-up (a)/(b): {ratio:.1f}x; test accuracy difference (b)-(a): "
          f"{100 * (fast['test_accuracy'] - base['test_accuracy']):+.1f} points")
    if fast.get("path_reason"):
        print(f"hpo trainer ran {fast['path']}: {fast['path_reason']}")
    out = args.json or (os.path.join(os.environ["OUT"], "bench_trainer.json") if os.environ.get("OUT") else None)
    if out:
        record = {"device": name, "torch": torch.__version__, "images": n, "batch": args.batch, "epochs": args.epochs,
                  "baseline": base, "hpo": fast, "speedup": ratio}
        Path(out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
