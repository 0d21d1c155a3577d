"""What a study records of the code it runs: the model family's name with the distribution that
provides it and its version (and the data source's), never the code or a module path.

A worker compares the record with what is installed where it runs: without the distribution it
refuses the study naming the package and version to install; with another version it refuses too,
unless told to go on (``--allow-version-mismatch``), and then says so in every trial it runs.
"""

from __future__ import annotations

import importlib.metadata as md
from typing import Any

from hpo.errors import SpecError
from hpo.nn import registry

# Study system attr: {"model": {name, distribution, version}, "data": {...}}; a searched family
# records every candidate under "models" (a list of the same records) besides its first as "model".
ATTR = "hpo:plugins"
BUILTIN_SOURCES = ("csv", "fashion_mnist", "mnist")


def _hpo_version() -> str:
    try:
        return md.version("hpo")
    except md.PackageNotFoundError:
        return "?"


def record(families: tuple[str, ...], source: str) -> dict[str, Any]:
    """The record of a study of the model ``families`` (one, or a searched family's candidates) on
    data source ``source``, as installed here.

    Raises:
        SpecError: as ``hpo.nn.registry.entry``.
    """
    from hpo.data import registry as sources  # the data sources' registry: only create-study reads it

    data = ({"name": source, "distribution": "hpo", "version": _hpo_version()} if source in BUILTIN_SOURCES
            else sources.entry(source).provenance)
    models = [registry.entry(f).provenance for f in families]
    return {"model": models[0], "data": data, **({"models": models} if len(models) > 1 else {})}


def _family_records(recorded: dict[str, Any] | None) -> list[dict[str, str]]:
    recorded = recorded or {}
    return recorded.get("models") or ([recorded["model"]] if recorded.get("model") else [])


def _install_hint(rec: dict[str, str]) -> str:
    return f"pip install '{rec['distribution']}=={rec['version']}'"


def check_installed(recorded: dict[str, Any] | None, *, study: str) -> None:
    """Refuse a study whose model family is not installed here, naming the package and version.

    Raises:
        SpecError: one line.
    """
    for rec in _family_records(recorded):
        if rec["name"] not in registry.names():
            raise SpecError(f"study {study!r} uses model family {rec['name']!r} from {rec['distribution']} "
                            f"{rec['version']}, which is not installed here: {_install_hint(rec)}")


def mismatches(recorded: dict[str, Any] | None, *, study: str, allow: bool) -> list[str]:
    """The differences between the study's recorded family and the one installed here (different
    distribution or version), each as one line; none for a study created before the record.

    Raises:
        SpecError: when there is a difference and ``allow`` is false (one line naming both versions
            and the package to install), or the family is not installed (see :func:`check_installed`).
    """
    check_installed(recorded, study=study)
    notes = []
    for rec in _family_records(recorded):
        here = registry.entry(rec["name"]).provenance
        if (here["distribution"], here["version"]) == (rec["distribution"], rec["version"]):
            continue
        note = (f"model family {rec['name']!r}: the study was created with {rec['distribution']} {rec['version']}, "
                f"this machine has {here['distribution']} {here['version']}")
        if not allow:
            raise SpecError(f"study {study!r}: {note}: {_install_hint(rec)}, or pass --allow-version-mismatch")
        notes.append(note)
    return notes
