"""Reading a spec's YAML with bounds: a size limit on the file, and aliases and nesting checked on
the event stream before anything is built, so a small file cannot expand into a large document
(a "billion laughs") nor nest deep enough to exhaust the stack.

YAML aliases stay allowed for what they are for (one block of settings reused a few times); what
is bounded is the size of the document they expand to (``MAX_NODES``) and its depth (``MAX_DEPTH``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from hpo.errors import SpecError

MAX_SPEC_BYTES = 1 << 20  # a spec is a page of settings; data go in CSV files
MAX_NODES = 100_000  # values and collections of the document, aliases expanded
MAX_DEPTH = 64  # collections inside collections


def _where(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "?"


def check_events(text: str, source: str) -> None:
    """Walk the YAML events of ``text`` (nothing is composed) and refuse a document that would
    expand past ``MAX_NODES`` values or nest deeper than ``MAX_DEPTH``.

    Raises:
        SpecError: one line naming ``source``, the line and column, and the limit; never the value.
        yaml.YAMLError: the text is not YAML (the caller reports it).
    """
    sizes: dict[str, int] = {}  # anchor -> nodes it expands to
    stack: list[list[Any]] = []  # open collections: [nodes so far, anchor]
    total = 0

    def add(n: int, mark: Any) -> None:
        nonlocal total
        total += n
        if stack:
            stack[-1][0] += n
        if total > MAX_NODES:
            raise SpecError(f"{source}: {_where(mark)}: the document expands to more than {MAX_NODES:,} values "
                            f"(YAML aliases repeat what they refer to); write a smaller spec")

    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        mark = event.start_mark
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in {anchor for _, anchor in stack}:
                raise SpecError(f"{source}: {_where(mark)}: alias *{event.anchor} refers to a value that holds it; "
                                f"a spec cannot refer to itself")
            add(sizes.get(event.anchor, 1), mark)
        elif isinstance(event, yaml.ScalarEvent):
            if event.anchor is not None:
                sizes[event.anchor] = 1
            add(1, mark)
        elif isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            if len(stack) >= MAX_DEPTH:
                raise SpecError(f"{source}: {_where(mark)}: nested more than {MAX_DEPTH} levels deep; "
                                f"a spec is a few levels of settings")
            add(1, mark)
            stack.append([1, event.anchor])
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            size, anchor = stack.pop()
            if anchor is not None:
                sizes[anchor] = size
            if stack:
                stack[-1][0] += size - 1  # the parent counted the collection itself on its start


def read_yaml(path: Path) -> Any:
    """The YAML document in ``path``, read within the limits above.

    Raises:
        SpecError: one line: the file cannot be read, is larger than ``MAX_SPEC_BYTES``, is not
            UTF-8 text, is not YAML (with line and column), or is past the limits of ``check_events``.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SPEC_BYTES + 1)
    except OSError as e:
        raise SpecError(f"{path}: cannot read: {e.strerror or e}") from e
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(f"{path}: larger than {MAX_SPEC_BYTES:,} bytes; a spec is a page of settings "
                        f"(data go in CSV files that it names)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise SpecError(f"{path}: line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}); "
                        f"is this a YAML spec?") from e
    try:
        check_events(text, str(path))
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise SpecError(f"{path}: {_where(mark)}: malformed YAML: {getattr(e, 'problem', None) or e}") from e
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise SpecError(f"{path}: malformed YAML: {str(e).splitlines()[0][:200]}") from e
