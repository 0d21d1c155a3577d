"""The worked example's family (examples/resnet_small) on 32x32 RGB images in an image folder:
hpo's trainer (the folder decoded once into one array, on the device, batches by index, CUDA graph
where it can) against the usual loop (torchvision ImageFolder + ToTensor + Normalize + DataLoader),
same model, same batch size, same run.

    python benchmarks/bench_plugin.py --images 5000 --epochs 2 --device cuda   # the GPU figure
    python benchmarks/bench_plugin.py --images 2000 --epochs 1 --device cpu

The images are synthetic (a coloured square per class, on noise), written once to a temporary folder
as PNGs; the first epoch of each way is a warm-up, the reported figure is the mean of the later
epochs (with --epochs 1, the only one). Prints seconds per epoch for each way and the ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "examples" / "resnet_small"))  # the family's code, without installing it

from hpo_resnet_small.family import build  # noqa: E402

from hpo.data.builtin_sources import read_image_folder  # noqa: E402
from hpo.data.dataset import Dataset  # noqa: E402
from hpo.data.splits import split_indices  # noqa: E402
from hpo.spec.hyperparams import resolve  # noqa: E402
from hpo.training.trainer import train  # noqa: E402

HP = {"blocks": 2, "width": 16, "dropout": 0.1, "batch_size": 64, "lr": 1e-3, "optimizer": "Adam"}


def write_images(root: Path, n: int, classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        c = i % classes
        img = rng.integers(0, 80, size=(32, 32, 3), dtype=np.uint8)
        img[4 + c:16 + c, 4 + 2 * c % 16:16 + 2 * c % 16, c % 3] = 200 + c * 5
        folder = root / str(c)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, "RGB").save(folder / f"{i}.png")


def dataloader_way(root: Path, epochs: int, device: torch.device) -> list[float]:
    from torchvision import datasets, transforms

    ds = datasets.ImageFolder(str(root), transform=transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))]))
    loader = torch.utils.data.DataLoader(ds, batch_size=HP["batch_size"], shuffle=True, num_workers=2,
                                         pin_memory=device.type == "cuda")
    torch.manual_seed(0)
    model = build(HP, in_shape=(3, 32, 32), out_features=10).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=HP["lr"])
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        model.train()
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def hpo_way(root: Path, epochs: int, device: torch.device) -> tuple[list[float], float, str]:
    start = time.perf_counter()
    a = read_image_folder(train=str(root), test=str(root))  # decoded once (the test set is the same folder here)
    decode = time.perf_counter() - start
    x = torch.from_numpy(a.x).float().div_(255).sub_(0.5).div_(0.25)
    y = torch.from_numpy(a.y)
    train_idx, val_idx = split_indices(len(y), val_fraction=0.01, seed=0, labels=a.y)  # train on (almost) all
    data = Dataset(task="classification", x=x, y=y, train_idx=torch.from_numpy(train_idx),
                   val_idx=torch.from_numpy(val_idx), x_test=x[:64], y_test=y[:64], in_shape=(3, 32, 32),
                   out_features=10, classes=a.classes).to(device)
    hp = resolve({**{k: v for k, v in HP.items() if k not in ("blocks", "width", "dropout")}, "epochs": epochs})
    hp.update(blocks=HP["blocks"], width=HP["width"], dropout=HP["dropout"])
    torch.manual_seed(0)
    model = build(hp, in_shape=(3, 32, 32), out_features=10).to(device)
    times: list[float] = []
    last = [time.perf_counter()]

    def on_epoch(epoch, metrics):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    result = train(model, data, hp, seed=0, on_epoch=on_epoch)
    return times, decode, result.path + (f" ({result.path_reason})" if result.path_reason else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        write_images(root, args.images)
        loop = dataloader_way(root, args.epochs, device)
        ours, decode, path = hpo_way(root, args.epochs, device)
    steady = lambda t: float(np.mean(t[1:] if len(t) > 1 else t))  # noqa: E731
    print(f"device {device}, torch {torch.__version__}, {args.images} images 32x32 RGB, resnet_small "
          f"blocks {HP['blocks']} width {HP['width']}, batch {HP['batch_size']}")
    print(f"DataLoader loop (ImageFolder, ToTensor, 2 loader workers): {steady(loop):.3f} s/epoch  {[round(t, 3) for t in loop]}")
    print(f"hpo trainer ({path}): {steady(ours):.3f} s/epoch  {[round(t, 3) for t in ours]}; "
          f"folder decoded once in {decode:.2f} s")
    print(f"ratio: {steady(loop) / steady(ours):.1f}x")


if __name__ == "__main__":
    main()
