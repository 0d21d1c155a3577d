"""Checkpoint files: one per running trial lineage and one per unfinished retrain of a study,
replaced as training goes on and deleted when the trial's lineage (or the retrain) ends.

Where: ``<artifact folder>/checkpoints/<study name>/trial-<N>.ckpt``, N the number of the
lineage's *original* trial (``hpo.store.budget.retried_trial_number``), so that a retry on another
worker finds it, and ``retrain.ckpt``. The artifact folder is the one retrain artifacts use
(``--artifacts``, ``HPO_ARTIFACTS``, else beside a SQLite store): workers on several machines
share checkpoints when they share that folder.

Why plain files in that folder rather than ``optuna.artifacts.upload_artifact``: every upload is
a new file plus a record in the study's system attrs, and an artifact can be neither replaced nor
renamed, so a trial checkpointing every minute would pile up files and records. A file replaced
atomically (``os.replace`` of a complete temporary file in the same folder) is never seen half
written, costs one write, and leaves nothing behind once deleted.

A file is a magic line, one JSON header line (``meta``: who wrote it, for which trial and
parameters; ``size``; ``sha256`` of meta and payload) and the payload written by ``torch.save``
(tensors and plain containers only: read back with ``weights_only=True``, never executed). A file
that fails its checksum or does not match what the reader expects (another study's, other
parameters) is ignored with a warning and removed: the trial starts over.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hpo.errors import warn
from hpo.spec.schema import StudySpec
from hpo.store.artifacts import artifact_dir
from hpo.store.paths import name_in

MAGIC = b"hpo-checkpoint 1\n"
SUFFIX = ".ckpt"
RETRAIN_KEY = "retrain"

def trial_key(number: int) -> str:
    """The key of trial lineage ``number`` (its original trial's number)."""
    return f"trial-{number}"


def fingerprint(value: Any) -> str:
    """sha256 of a JSON-able value in canonical form (a spec's dict, a parameter set)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


class CheckpointStore:
    """The checkpoint files of one study, in ``folder`` (created on first save)."""

    def __init__(self, folder: Path, *, warn: Callable[[str], None] = warn):
        self.folder, self.warn = Path(folder), warn

    @classmethod
    def for_study(cls, study_name: str, *, storage_url: str | None = None,
                  artifacts: str | None = None) -> CheckpointStore:
        """The study's checkpoints under the artifact folder of ``storage_url`` / ``artifacts``
        (``hpo.store.artifacts.artifact_dir``)."""
        return cls(name_in(artifact_dir(storage_url, artifacts) / "checkpoints", study_name, what="study name"))

    @classmethod
    def for_spec(cls, spec: StudySpec, *, storage_url: str | None = None,
                 artifacts: str | None = None) -> CheckpointStore | None:
        """The study's checkpoints as :meth:`for_study` finds them, or None when the spec turns
        checkpoints off (``checkpoint: false``): how a worker and a retrain open them."""
        if not spec.checkpoint.enabled:
            return None
        return cls.for_study(spec.name, storage_url=storage_url, artifacts=artifacts)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}{SUFFIX}"

    def save(self, key: str, payload: dict[str, Any], *, meta: dict[str, Any]) -> Path:
        """Write ``payload`` (tensors and plain containers) under ``key``, replacing the file
        there in one step. Returns its path.

        Raises:
            OSError: when the file system refuses the write (nothing is replaced then).
        """
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        body = buffer.getvalue()
        meta_text = json.dumps(meta, sort_keys=True)
        header = {"meta": json.loads(meta_text), "size": len(body),
                  "sha256": hashlib.sha256(meta_text.encode() + body).hexdigest()}
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        tmp = self.folder / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(MAGIC + json.dumps(header).encode() + b"\n" + body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    def meta(self, key: str) -> dict[str, Any] | None:
        """The header's ``meta`` of the file under ``key`` (unchecked), or None without one."""
        try:
            with open(self.path(key), "rb") as f:
                if f.readline() != MAGIC:
                    return None
                return json.loads(f.readline())["meta"]
        except (OSError, ValueError, KeyError):
            return None

    def read(self, key: str, *, expect: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The payload and meta under ``key``, or None when there is none.

        A file that is damaged (bad magic or header, wrong size, checksum mismatch, unreadable
        payload) or whose meta differs from ``expect`` in any key is removed with a warning naming
        the file and the reason, and None is returned.
        """
        path = self.path(key)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            self.warn(f"checkpoint {path} cannot be read ({e.strerror}); ignored, training starts over")
            return None
        reason, payload, meta = self._check(raw, expect)
        if reason is None:
            try:
                payload = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any unreadable payload is a damaged file
                reason = f"unreadable payload ({type(e).__name__})"
        if reason is not None:
            self.warn(f"checkpoint {path} ignored: {reason}; training starts over")
            path.unlink(missing_ok=True)
            return None
        return payload, meta

    @staticmethod
    def _check(raw: bytes, expect: dict[str, Any]) -> tuple[str | None, bytes, dict]:
        if not raw.startswith(MAGIC):
            return "not an hpo checkpoint", b"", {}
        end = raw.find(b"\n", len(MAGIC))
        try:
            header = json.loads(raw[len(MAGIC):end])
            meta, size, digest = header["meta"], int(header["size"]), str(header["sha256"])
        except (ValueError, KeyError, TypeError):
            return "damaged header", b"", {}
        body = raw[end + 1:]
        if len(body) != size:
            return f"{len(body)} bytes of payload, the header says {size}", b"", meta
        if hashlib.sha256(json.dumps(meta, sort_keys=True).encode() + body).hexdigest() != digest:
            return "checksum mismatch", b"", meta
        expected = json.loads(json.dumps(expect, sort_keys=True))
        for name, value in expected.items():
            if meta.get(name) != value:
                return f"written for {name} {meta.get(name)!r}, not {value!r}", b"", meta
        return None, body, meta

    def delete(self, key: str) -> None:
        """Remove the file under ``key`` and any temporary file a killed writer left beside it."""
        path = self.path(key)
        path.unlink(missing_ok=True)
        if self.folder.is_dir():
            for leftover in self.folder.glob(f".{path.name}.*.tmp"):
                leftover.unlink(missing_ok=True)

    def keys(self) -> list[str]:
        """Keys of the files there are now."""
        if not self.folder.is_dir():
            return []
        return sorted(p.name[:-len(SUFFIX)] for p in self.folder.glob(f"*{SUFFIX}"))
