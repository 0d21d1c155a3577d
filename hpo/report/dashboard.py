"""optuna-dashboard on the study store and its artifact store (retrain files show in trial views)."""

from __future__ import annotations

import errno
import ipaddress
import socket
import sys
from collections.abc import Callable

from hpo.errors import HpoError
from hpo.store import optuna_private


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback address (``localhost``, 127.x, ::1)."""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror as e:
        raise HpoError(f"--host: cannot resolve {host!r}: {e.strerror}") from e
    return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def check_port(host: str, port: int) -> None:
    """Bind and release ``host:port`` the way the server will, to fail before starting.

    Raises:
        HpoError: the port is in use or may not be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # wsgiref's server sets SO_REUSEADDR too: a port in TIME_WAIT is free, a listening one is not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise HpoError(f"--port: {host}:{port} is already in use; pick another with --port") from e
            raise HpoError(f"--host/--port: cannot bind {host}:{port}: {e.strerror}") from e


def study_url(study_name: str, *, storage_url: str | None = None, storage=None, host: str = "127.0.0.1",
              port: int = 8080) -> str:
    """The dashboard page of one study.

    Args:
        storage: an open storage (default: open ``storage_url``).

    Raises:
        StoreError: no such study.
    """
    from hpo.search.study import open_study

    study, _ = open_study(study_name, storage if storage is not None else storage_url)
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/dashboard/studies/{optuna_private.study_id(study)}"


def serve(*, storage_url: str | None = None, artifacts: str | None = None, host: str = "127.0.0.1",
          port: int = 8080, study_name: str | None = None, echo: Callable[[str], None] = print) -> None:
    """Run optuna-dashboard until interrupted, after echoing its URL (that of ``study_name``'s page
    when given; the dashboard serves every study of the store).

    Warns on stderr when ``host`` is reachable from other machines (the dashboard has no login,
    and it can delete studies).

    Raises:
        HpoError: the port is in use, the host cannot be bound, the store cannot be opened, or
            there is no study ``study_name``.
    """
    import optuna_dashboard

    from hpo.store.artifacts import open_artifact_store
    from hpo.store.storage import open_storage
    if not is_loopback(host):
        print(f"hpo: warning: the dashboard on {host} is reachable from other machines and has no login; "
              f"anyone who reaches it can read and delete studies", file=sys.stderr)
    check_port(host, port)
    storage = open_storage(storage_url, heartbeat=False)
    if study_name is not None:
        line = f"study {study_name}: {study_url(study_name, storage=storage, host=host, port=port)}"
    else:
        line = f"dashboard: http://{f'[{host}]' if ':' in host else host}:{port}/dashboard"
    echo(line)
    optuna_dashboard.run_server(storage, host=host, port=port,
                                artifact_store=open_artifact_store(storage_url, artifacts))
