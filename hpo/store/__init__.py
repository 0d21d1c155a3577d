"""The study store: where it is (``config``), which errors are retried (``retry``), Optuna's RDB
store as workers use it (``storage``), safe schema creation (``schema``), coordination queries
(``queries``) and the artifact store (``artifacts``)."""

from hpo.store.artifacts import artifact_dir, open_artifact_store
from hpo.store.config import DEFAULT_URL, Heartbeat, driver_url, engine_kwargs, mask_url, resolve_url, sqlite_path
from hpo.store.queries import RETRY_ATTR, claim, release
from hpo.store.retry import call_retrying, is_transient
from hpo.store.storage import RetryingRDBStorage, WorkerStorage, open_storage

__all__ = [
    "DEFAULT_URL", "RETRY_ATTR", "Heartbeat", "RetryingRDBStorage", "WorkerStorage", "artifact_dir", "call_retrying",
    "claim", "driver_url", "engine_kwargs", "is_transient", "mask_url", "open_artifact_store", "open_storage",
    "release", "resolve_url", "sqlite_path",
]
