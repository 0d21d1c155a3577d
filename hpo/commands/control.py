"""``hpo stop``, ``hpo resume``, ``hpo extend``, ``hpo delete``: a study's control, kept in the store
(``hpo.store.control``) so that every worker agrees."""

import click

from hpo.commands.options import artifacts_option, storage_option, study_option


@click.command()
@study_option
@storage_option
@click.option("--now", is_flag=True, help="Also stop running trials at their next epoch (checkpointed, re-queued).")
def stop(study_name: str, storage: str | None, now: bool) -> None:
    """Stop a study: workers finish their running trial (--now: stop it at the next epoch) and exit 0."""
    from hpo.store import control

    store, sid = control.open_control(study_name, storage)
    control.stop(store, sid, rule="stop", reason="hpo stop --now" if now else "hpo stop", now=now)
    click.echo(f"study {study_name!r} stopped; its workers "
               + ("stop their running trials at the next epoch (re-queued)" if now else "finish their running trials")
               + f" and exit; hpo resume --study {study_name} lifts it")


@click.command()
@study_option
@storage_option
def resume(study_name: str, storage: str | None) -> None:
    """Lift a study's stop (by hpo stop or a stopping rule): new workers run its trials again."""
    from hpo.store import control

    store, sid = control.open_control(study_name, storage)
    lifted = control.resume(store, sid)
    click.echo(f"study {study_name!r} resumed (was stopped by {lifted['rule']}: {lifted['reason']}); "
               f"run: hpo worker --study {study_name}" if lifted else f"study {study_name!r} was not stopped")


@click.command()
@study_option
@storage_option
@click.option("--n-trials", type=click.IntRange(min=1), required=True, metavar="N", help="The new trial budget.")
def extend(study_name: str, storage: str | None, n_trials: int) -> None:
    """Raise a study's trial budget; its workers (or new ones) run the added trials."""
    from hpo.search.study import open_study
    from hpo.store import control

    store, sid = control.open_control(study_name, storage)
    _, spec = open_study(study_name, store)
    before = control.n_trials_of(store, sid, spec.budget.n_trials)
    control.extend(store, sid, n_trials, current=before)
    click.echo(f"study {study_name!r}: budget {before} -> {n_trials} trials; run: hpo worker --study {study_name}")


@click.command()
@study_option
@storage_option
@artifacts_option
@click.option("--force", is_flag=True, help="Delete even while workers hold running trials.")
def delete(study_name: str, storage: str | None, artifacts: str | None, force: bool) -> None:
    """Delete a study with its trials, its data in the store and its checkpoints."""
    from hpo.store import control

    control.delete_study(study_name, storage_url=storage, artifacts=artifacts, force=force)
    click.echo(f"deleted study {study_name!r} (trials, data no other study uses, checkpoints)")


COMMANDS = [stop, resume, extend, delete]
