"""Generate the shipped regression data set once (fixed seed); the CSVs beside it are its output.

An unknown smooth f: R -> R sampled at 100 noisy training points with two gaps in x
("dark intervals": no training data there) and at 100 less noisy test points over the whole range,
gaps included, so the report can show how models guess inside them.

    python studies/data/make_regression.py
"""

from pathlib import Path

import numpy as np

SEED = 20261123
X_RANGE = (-4.0, 4.0)
GAPS = ((-2.2, -1.2), (1.0, 2.0))
TRAIN_NOISE, TEST_NOISE = 0.4, 0.1


def f(x: np.ndarray) -> np.ndarray:
    return np.sin(1.5 * x) + 0.3 * x + 0.4 * np.cos(4.0 * x) * np.exp(-0.1 * x**2)


def main() -> None:
    rng = np.random.default_rng(SEED)
    x_train = []
    while len(x_train) < 100:
        x = rng.uniform(*X_RANGE)
        if not any(lo < x < hi for lo, hi in GAPS):
            x_train.append(x)
    x_train = np.sort(np.array(x_train))
    x_test = np.sort(rng.uniform(*X_RANGE, size=100))
    here = Path(__file__).parent
    for name, x, noise in (("train", x_train, TRAIN_NOISE), ("test", x_test, TEST_NOISE)):
        y = f(x) + rng.normal(0.0, noise, size=x.shape)
        rows = "\n".join(f"{a:.6f},{b:.6f}" for a, b in zip(x, y))
        (here / f"regression_{name}.csv").write_text("x,y\n" + rows + "\n")


if __name__ == "__main__":
    main()
