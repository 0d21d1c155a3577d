"""Where retrain artifacts (weights, predictions, metrics) are kept: ``--artifacts``,
``HPO_ARTIFACTS``, or ``artifacts/`` beside a SQLite store (``storage/artifacts`` otherwise)."""

from __future__ import annotations

import os
from pathlib import Path

from optuna.artifacts import FileSystemArtifactStore

from hpo.store.config import STORAGE_ROOT, resolve_url, sqlite_path


def artifact_dir(url: str | None = None, flag: str | None = None) -> Path:
    if flag or os.environ.get("HPO_ARTIFACTS"):
        return Path(flag or os.environ["HPO_ARTIFACTS"])
    path = sqlite_path(resolve_url(url))
    return (path.parent if path is not None else STORAGE_ROOT) / "artifacts"


class ArtifactFolder(FileSystemArtifactStore):
    """Optuna's file-system artifact store, saying which ``folder`` it keeps the files in."""

    def __init__(self, folder: Path):
        super().__init__(str(folder))
        self.folder = folder


def open_artifact_store(url: str | None = None, flag: str | None = None) -> ArtifactFolder:
    path = artifact_dir(url, flag)
    path.mkdir(parents=True, exist_ok=True)
    return ArtifactFolder(path)
