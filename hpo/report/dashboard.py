"""optuna-dashboard on the study store and its artifact store (retrain files show in trial views)."""

from __future__ import annotations

import errno
import ipaddress
import socket
import sys
from collections.abc import Callable
from typing import Any

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


NOTE_HEADING = "## Retrains (written by hpo retrain)"


def _num(value: Any) -> str:
    return "–" if value is None else f"{value:.4g}"


def retrain_note_section(metrics: dict[str, Any], *, retrain_id: str, trial_number: int, created: str) -> str:
    """One retrain in Markdown for the study's note: each fold's test scores (the best fold marked),
    then each ensemble's (majority and soft vote, or the mean)."""
    metric = metrics.get("metric") or "metric"
    best = metrics.get("best_fold")
    seconds = metrics.get("train_seconds")
    lines = [f"### Retrain {retrain_id} of trial #{trial_number} ({created[:16].replace('T', ' ')} UTC)", "",
             f"{metrics.get('folds')} folds ({metrics.get('split', 'k-fold')}), {metrics.get('path', '?')} on "
             f"{metrics.get('device', '?')}" + (f", {seconds:.1f} s" if seconds is not None else "") + ".", ""]
    def loss(scores: dict) -> str:  # regression scores by its loss: said once
        value = scores.get("test_loss")
        return "" if value is None or value == scores.get("test_metric") else f", test loss {_num(value)}"

    for f in metrics.get("per_fold", []):
        mark = " **(best)**" if f.get("fold") == best else ""
        lines.append(f"- fold {f.get('fold')}{mark}: test {metric} {_num(f.get('test_metric'))}{loss(f)} "
                     f"({f.get('epochs_run', '?')} epochs)")
    for name, scores in (metrics.get("ensemble") or {}).items():
        lines.append(f"- **{name.replace('_', ' ')}** of the folds: test {metric} "
                     f"{_num(scores.get('test_metric'))}{loss(scores)}")
    return "\n".join(lines) + "\n"


def save_retrain_note(study, metrics: dict[str, Any], record) -> None:
    """Put a retrain's summary (``metrics``: the retrain's metrics.json; ``record``: its
    ``hpo.retrain.results.RetrainRecord``) on the study's optuna-dashboard note (Markdown), newest first under
    ``NOTE_HEADING``; what anyone wrote above that heading in the dashboard is kept."""
    from optuna_dashboard import get_note, save_note

    mine, _, earlier = get_note(study).partition(NOTE_HEADING)
    body = "\n\n".join(part for part in (
        mine.rstrip(), NOTE_HEADING, retrain_note_section(metrics, retrain_id=record.id, trial_number=record.trial_number,
                                            created=record.created).rstrip(),
        earlier.strip()) if part)
    save_note(study, body + "\n")
