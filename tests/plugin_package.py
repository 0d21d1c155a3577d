"""Installed packages made on a temporary path: a ``.dist-info`` folder with real entry-point
metadata (``entry_points.txt``), so ``importlib.metadata`` finds them as it finds a pip-installed
package, without touching the shared environment. Put the returned folder on ``sys.path`` (in-process,
then ``hpo.nn.registry.refresh()``) or on ``PYTHONPATH`` (the CLI)."""

from __future__ import annotations

import os
from pathlib import Path

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
