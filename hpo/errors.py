"""One small error family. Library code raises these; only the CLI decides how to show them.
A problem that does not stop the run is reported with :func:`warn`."""

from __future__ import annotations

import logging
import sys


class HpoError(Exception):
    """Base class: a problem the user can fix. The CLI prints it on one line and exits 2."""


class SpecError(HpoError):
    """A study spec (YAML or stored JSON) is malformed or names something unknown."""


class DataError(HpoError):
    """A data set cannot be found, read or used."""


class StoreError(HpoError):
    """The study store cannot be opened, or a study is missing / already there."""


class TrainingError(HpoError):
    """Training cannot go on: diverged (NaN/inf loss) or the model cannot be built for the data."""


def warn(text: str, *, logger: str = "hpo") -> None:
    """The one warning printer: ``warning: TEXT`` on stderr (flushed, so that it lands between
    progress lines) and the same text to the ``logger`` log."""
    logging.getLogger(logger).warning(text)
    print(f"warning: {text}", file=sys.stderr, flush=True)
