"""The one rule for names that become paths: a study name (from the command line, the store or an
export's manifest), a file name read from the store, a checksum naming a cached file. Each is
joined to its folder here, and nothing that could leave that folder is let through.

A name must be one plain path component: not empty, not ``.`` or ``..``, no ``/``, ``\\`` or NUL,
at most ``COMPONENT_MAX_BYTES`` bytes (UTF-8) with its suffix. Checked lexically, before the file
system is touched: ``root / name`` then names an entry of ``root`` itself, whatever exists on disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hpo.errors import HpoError
from hpo.spec.domains import DOMAINS, is_study_name, show

COMPONENT_MAX_BYTES = 255  # one path component on Linux and macOS


def component_problem(name: Any, *, suffix: str = "") -> str | None:
    """Why ``name + suffix`` is not one plain path component (None when it is)."""
    if not isinstance(name, str) or not name:
        return "it is empty" if name == "" else "it is not a string"
    if name in (".", ".."):
        return f"{name!r} names a folder, not an entry of it"
    if any(ch in "/\\\0" for ch in name):
        return "it holds a slash, a backslash or a NUL"
    try:
        size = len((name + suffix).encode("utf-8"))
    except UnicodeEncodeError:
        return "it is not valid UTF-8"
    if size > COMPONENT_MAX_BYTES:
        return f"it is {size} bytes long; a file name has at most {COMPONENT_MAX_BYTES}"
    return None


def name_in(root: str | Path, name: Any, *, what: str, suffix: str = "") -> Path:
    """``root / (name + suffix)``, refused unless ``name`` is one plain path component.

    Args:
        what: how the caller names the value in the error (``--study``, ``manifest.json: study``).

    Raises:
        HpoError: one line naming ``what``, the value and the rule.
    """
    problem = component_problem(name, suffix=suffix)
    if problem is not None:
        raise HpoError(f"{what}: got {show(name)}; it would become a path outside {root} ({problem}); "
                       f"allowed: one plain file name")
    return Path(root) / f"{name}{suffix}"


def check_study_name(name: Any, *, what: str = "--study") -> str:
    """``name`` itself when it can name a study (``hpo.spec.domains.is_study_name``).

    Raises:
        HpoError: one line naming ``what``, the value and what is allowed.
    """
    if not is_study_name(name):
        raise HpoError(f"{what}: got {show(name)}; allowed: {DOMAINS['name']}")
    return name
