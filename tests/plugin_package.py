"""Installed packages made on a temporary path: a ``.dist-info`` folder with real entry-point
metadata (``entry_points.txt``), so ``importlib.metadata`` finds them as it finds a pip-installed
package, without touching the shared environment. Put the returned folder on ``sys.path`` (in-process,
then ``hpo.nn.registry.refresh()``) or on ``PYTHONPATH`` (the CLI)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import REPO

EXAMPLE = REPO / "examples" / "resnet_small"


def fake_install(site: Path, *, dist: str, version: str, entry_points: dict[str, dict[str, str]],
                 modules: dict[str, str] | None = None) -> Path:
    """Write ``site/<dist>-<version>.dist-info`` (METADATA, entry_points.txt) and ``modules``
    (relative path -> source text) into ``site``; returns ``site``."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in eps.items()) + "\n"
        for group, eps in entry_points.items()))
    for rel, text in (modules or {}).items():
        path = site / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return site


def install_example(site: Path, *, version: str = "0.1.0") -> Path:
    """The worked example's package (examples/resnet_small) as installed at ``version``: its
    metadata in ``site``, its code read from the example itself."""
    fake_install(site, dist="hpo-resnet-small", version=version,
                 entry_points={"hpo.models": {"resnet_small": "hpo_resnet_small.family:family"}})
    (site / "hpo_resnet_small").symlink_to(EXAMPLE / "hpo_resnet_small", target_is_directory=True)
    return site


def env_with(site: Path, env: dict[str, str]) -> dict[str, str]:
    """``env`` with ``site`` on PYTHONPATH, after the repository (the CLI runs hpo from the worktree)."""
    return {**env, "PYTHONPATH": os.pathsep.join([str(REPO), str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


@pytest.fixture
def example_installed(tmp_path, monkeypatch):
    """The worked example's family installed for this test's process (see :func:`install_example`)."""
    from hpo.nn import registry

    site = install_example(tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    registry.refresh()
    yield site
    registry.refresh()


def digits_folders(root: Path, *, n_train: int = 240, n_test: int = 60) -> tuple[Path, Path]:
    """scikit-learn's bundled 8x8 digits written as RGB PNGs in torchvision's ImageFolder layout
    (``root/train/<digit>/<i>.png``, ``root/test/...``): grey ink on a blue ground, so the three
    channels differ. Returns the train and test folders."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = (digits.images * (255 / 16)).astype(np.uint8)
    for part, rows in (("train", range(n_train)), ("test", range(n_train, n_train + n_test))):
        for i in rows:
            folder = root / part / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            g = grey[i]
            rgb = np.stack([g, g, 255 - g // 2], axis=-1)
            Image.fromarray(rgb, "RGB").save(folder / f"{i}.png")
    return root / "train", root / "test"
