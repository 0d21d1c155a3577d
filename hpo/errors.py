"""One small error family. Library code raises these; only the CLI decides how to show them.
A problem that does not stop the run is reported with :func:`warn`."""

from __future__ import annotations

import logging
import sys


class HpoError(Exception):
    """Base class: a problem the user can fix. The CLI prints it on one line and exits with
    ``exit_code`` (2: bad input)."""

    exit_code = 2


class SpecError(HpoError):
    """A study spec (YAML or stored JSON) is malformed or names something unknown."""


class DataError(HpoError):
    """A data set cannot be found, read or used."""


class StoreError(HpoError):
    """The study store cannot be opened, or a study is missing / already there."""


class StoreFault(StoreError):
    """The store failed under a command that was right: nothing the command was given is wrong,
    so a worker's running trial is not failed for it (the next worker re-queues it)."""


class StoreUnreachable(StoreFault):
    """The store stayed unreachable for longer than ``HPO_STORE_RETRY``. Exit code 75
    (``EX_TEMPFAIL``: try again later); ``hpo fleet`` restarts a worker that exits with it."""

    exit_code = 75


class StoreFull(StoreFault):
    """The store's disk (or table space) is full. Exit code 74 (``EX_IOERR``)."""

    exit_code = 74


class TrainingError(HpoError):
    """Training cannot go on: diverged (NaN/inf loss) or the model cannot be built for the data."""


def warn(text: str, *, logger: str = "hpo") -> None:
    """The one warning printer: ``warning: TEXT`` on stderr (flushed, so that it lands between
    progress lines) and the same text to the ``logger`` log."""
    logging.getLogger(logger).warning(text)
    print(f"warning: {text}", file=sys.stderr, flush=True)
