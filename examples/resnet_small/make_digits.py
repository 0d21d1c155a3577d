"""Write scikit-learn's bundled 8x8 digits as RGB PNGs in torchvision's ImageFolder layout
(images/train/<digit>/<i>.png, images/test/...), the data set digits.yaml points at.
Replace them with your own folders of images: one sub-folder per class."""

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

root = Path(__file__).resolve().parent / "images"
digits = load_digits()
grey = (digits.images * (255 / 16)).astype(np.uint8)
for i, (image, label) in enumerate(zip(grey, digits.target)):
    folder = root / ("train" if i < 1500 else "test") / str(label)
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.stack([image, image, 255 - image // 2], axis=-1), "RGB").save(folder / f"{i}.png")
print(f"wrote {len(grey)} images under {root}")
