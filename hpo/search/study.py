"""Studies in the store: create one from a spec, load one (with its spec) by name, delete one;
sampler and pruner.

The spec lives in the study's user attrs under ``hpo_spec``; sampler and pruner are rebuilt from it
by every worker, since Optuna does not persist them. A CSV study's data files live in the store
beside it (``hpo.store.data_tables``), shared with any other study of the same files.
"""

from __future__ import annotations

import copy
import time
import uuid
import warnings
from typing import Any

import optuna

from hpo.errors import SpecError, StoreError
from hpo.nn import registry
from hpo.search import provenance
from hpo.spec.domains import KNOWN_BEFORE_TRAINING, PRUNER_SETTINGS, SAMPLER_SETTINGS, show
from hpo.spec.hyperparams import DEFAULTS
from hpo.spec.schema import StudySpec, find_spec_file, load_spec_file, parse_spec
from hpo.store import data_tables as datastore
from hpo.store import optuna_private
from hpo.store.config import Heartbeat
from hpo.store.queries import study_identity
from hpo.training.seeds import sampler_seed

SPEC_ATTR = "hpo_spec"
SPEC_TEXT_ATTR = "hpo_spec_text"  # the spec file's text as its author wrote it (studies made from a file)
HEARTBEAT_ATTR = "hpo:heartbeat"  # study system attr: the heartbeat interval and grace period every worker uses
# Study system attr: a token drawn when the study is created. A study replaced by one of the same name
# is told apart by it even where the store reuses ids (SQLite reuses the highest row id once deleted).
CREATED_ATTR = "hpo:created"


def build_sampler(spec: StudySpec, *, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """The study's sampler, as every worker builds it.

    Which samplers take the per-worker ``seed_offset`` (``hpo.training.seeds.sampler_seed_offset``),
    and why:

    - tpe, nsga2, random: yes. Each draws its points from its own random stream; workers with one seed
      would draw the same points (TPE's startup trials are random ones too). TPE's later draws
      read the study's trials from the store, with the running ones as constant liars.
    - grid: no, the spec's seed only. StoreGridSampler shuffles the grid with its seed and records a
      trial's point as an index into that order (``grid_id``); workers with different seeds read
      the same index as different points, running some twice and others never. Points are
      handed out in the transaction that starts a trial (``hpo.search.grid``), not drawn at random.

    The pruners keep no per-worker state that decides anything (see :func:`build_pruner`), and a
    trial's training seed comes from its number in the study (``hpo.training.seeds.trial_seed``),
    never from a counter of the worker's own.
    """
    if spec.sampler.kind == "grid":
        from hpo.search.grid import StoreGridSampler
        from hpo.search.space import grid_space

        return StoreGridSampler(grid_space(spec), seed=spec.seed)
    seed = sampler_seed(spec.seed, seed_offset)
    if spec.sampler.kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler.kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=spec.sampler.population_size)
    # A space that changes from trial to trial (a searched family, `when:` conditions) is modelled
    # per group of parameters that appear together (Optuna's `group`); plain multivariate TPE
    # would model only the parameters every trial has and sample the rest independently.
    group = spec.sampler.multivariate and (spec.searches_family or any(p.when for p in spec.space))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # `group`
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=spec.sampler.n_startup_trials,
            multivariate=spec.sampler.multivariate, group=group, constant_liar=True)


class _RecentTrials:
    """``study`` whose trial list is read from the store at most every ``max_age`` seconds."""

    def __init__(self, study: optuna.Study, max_age: float):
        self._study, self._max_age = study, max_age
        self._trials: list[optuna.trial.FrozenTrial] = []
        self._read_at = -float("inf")
        self._trial_number: int | None = None  # the trial of the last check

    def checking(self, trial_number: int) -> _RecentTrials:
        """This view for a check of trial ``trial_number``; a trial's first check reads afresh."""
        if trial_number != self._trial_number:
            self._trial_number, self._read_at = trial_number, -float("inf")
        return self

    def wraps(self, study: optuna.Study) -> bool:
        return self._study is study

    def get_trials(self, deepcopy: bool = True, states=None) -> list[optuna.trial.FrozenTrial]:
        now = time.monotonic()
        if now - self._read_at > self._max_age:
            self._trials, self._read_at = self._study.get_trials(deepcopy=False), now
        trials = [t for t in self._trials if states is None or t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


class CachingMedianPruner(optuna.pruners.MedianPruner):
    """Optuna's median pruner, comparing against the study's trials as read at a trial's first
    check and at most ``max_age`` seconds ago after that. Each check otherwise re-reads every
    running trial of the study from the store: with short epochs that is most of a worker's
    store traffic, for medians that barely move."""

    def __init__(self, *args, max_age: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self._max_age = max_age
        self._recent: dict[int, _RecentTrials] = {}

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        recent = self._recent.get(optuna_private.study_id(study))
        if recent is None or not recent.wraps(study):
            recent = self._recent[optuna_private.study_id(study)] = _RecentTrials(study, self._max_age)
        # A trial's first check reads afresh: a lone worker then prunes exactly as Optuna would,
        # whatever the machine's speed, so its runs stay reproducible.
        return super().prune(recent.checking(trial.number), trial)


def last_step(spec: StudySpec) -> int:
    """The largest step a trial of the study reports: its most epochs, down to a multiple of
    ``report_every`` (steps are epochs done; see ``hpo.search.objective``)."""
    epochs = next((p for p in spec.space if p.name == "epochs"), None)
    if epochs is None:
        most = int(spec.fixed.get("epochs", DEFAULTS["epochs"]))
    else:
        most = int(max(epochs.choices) if epochs.kind == "choice" else epochs.high)
    return max(most // spec.report_every * spec.report_every, 1)


def build_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The study's pruner, as every worker builds it.

    Hyperband gets ``max_resource`` from the spec: with Optuna's default ("auto") each worker
    sets it from the longest trial completed when it first prunes, so workers that start at
    different times split the trial numbers into different brackets (a bracket is chosen by
    hashing the study name and the trial number, modulo budgets that depend on
    ``max_resource``). The median and Pareto pruners keep no state: they read the study's trials.
    """
    p = spec.pruner
    if p.kind == "pareto":
        from hpo.search.pareto import ParetoPruner

        known = [(o.metric, o.direction) for o in spec.targets if o.metric in KNOWN_BEFORE_TRAINING]
        return ParetoPruner(direction=spec.direction, known=known, n_startup_trials=p.n_startup_trials,
                            n_warmup_steps=p.n_warmup_steps)
    if p.kind == "none":
        return optuna.pruners.NopPruner()
    if p.kind == "wilcoxon":
        # Its steps are fold indices, not epochs (hpo.search.cv): it pairs each fold's value with
        # the best trial's value on the same fold.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.pruners.WilcoxonPruner(p_threshold=p.p_threshold, n_startup_steps=p.n_startup_steps)
    if p.kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p.min_resource, max_resource=last_step(spec),
                                              reduction_factor=p.reduction_factor)
    return CachingMedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps,
                        interval_steps=p.interval_steps)


def study_id(storage: optuna.storages.BaseStorage, name: str) -> int:
    """The id of study ``name``.

    Raises:
        StoreError: when there is no such study (listing the ones there are).
    """
    try:
        return storage.get_study_id_from_name(name)
    except KeyError:
        names = sorted(s.study_name for s in storage.get_all_studies())
        raise StoreError(f"no study named {name!r} in the store; studies there: {', '.join(names) or 'none'} "
                         f"(create one with: hpo create-study NAME)") from None


def _exists(storage: optuna.storages.BaseStorage, name: str) -> bool:
    try:
        storage.get_study_id_from_name(name)
        return True
    except KeyError:
        return False


def _data_files(spec: StudySpec) -> list[tuple[str, str]]:
    """(sha256, local path) of each data file the spec refers to: a CSV's own file, or a registry
    source's arrays written into the local data cache (``hpo.data.arrays``)."""
    from hpo.data.cache import cache_dir

    return [(ref["sha256"], str(cache_dir() / ref["sha256"]) if part == "arrays" else getattr(spec.data, part))
            for part, ref in (spec.data.files or {}).items()]


def delete(name: str, storage: optuna.storages.RDBStorage, *, sweep: bool = True) -> None:
    """Delete study ``name`` and, with ``sweep``, the data in the store that no study uses any more.

    Raises:
        StoreError: when there is no such study.
    """
    sid = study_id(storage, name)
    optuna.delete_study(study_name=name, storage=storage)
    datastore.release(storage.engine, sid, sweep=sweep)


def check_buildable(spec: StudySpec, *, source: str = "<spec>") -> None:
    """Build the spec's sampler and pruner once, as every worker will, and check that the store can
    hold its name.

    Raises:
        SpecError: one line naming the field, when Optuna's constructor refuses a setting or the
            name is longer than the store's study_name column.
    """
    limit = optuna_private.STUDIES.c.study_name.type.length
    if limit is not None and len(spec.name) > limit:
        raise SpecError(f"{source}: name: got a name of {len(spec.name)} characters; allowed: at most {limit} "
                        f"(the store's study_name column)")
    for section, build in (("sampler", build_sampler), ("pruner", build_pruner)):
        settings = getattr(spec, section).to_dict()
        try:
            build(spec)
        except (ValueError, TypeError, OverflowError) as e:
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            named = [k for k in settings if k != "kind" and k in message]
            field = f"{section}.{named[0]}" if len(named) == 1 else section
            value = settings[named[0]] if len(named) == 1 else settings
            raise SpecError(f"{source}: {field}: got {show(value)}; allowed: what Optuna's {section} "
                            f"{settings['kind']!r} accepts ({message})") from e


def create(spec: StudySpec, storage: optuna.storages.RDBStorage, *, force: bool = False,
           heartbeat: Heartbeat | None = None, source: str = "<spec>", text: str | None = None) -> optuna.Study:
    """Create the study with its spec stored inside it, its data files (``spec.data.files``, read
    from ``spec.data.train``/``test`` unless the store holds them already) beside it, and the
    heartbeat settings its workers will share (default: ``HPO_HEARTBEAT_INTERVAL``/``HPO_GRACE_PERIOD``,
    else 10 s / 30 s).

    Args:
        source: how to name the spec in errors (its file).
        text: the spec file's text, kept as written (comments and all) for the report.

    Raises:
        SpecError: when Optuna refuses the sampler or pruner settings, or the name does not fit
            the store (see ``check_buildable``); nothing is written then.
        StoreError: when a study of that name exists and ``force`` is false, or a heartbeat
            knob is bad.
        DataError: when a data file to store is missing or changed since ``hpo.data.tables`` read it.
    """
    check_buildable(spec, source=source)
    heartbeat = heartbeat or Heartbeat.from_env()
    if _exists(storage, spec.name):
        if not force:
            raise StoreError(f"study {spec.name!r} already exists; pass --force to delete it and start over")
        # Its data stay until the new study refers to them: the same data are not stored again.
        delete(spec.name, storage, sweep=False)
    try:
        study = optuna.create_study(study_name=spec.name, storage=storage, directions=spec.directions,
                                    sampler=build_sampler(spec), pruner=build_pruner(spec))
    except optuna.exceptions.DuplicatedStudyError:  # another process created it since the check above
        raise StoreError(f"study {spec.name!r} already exists; pass --force to delete it and start over") from None
    try:
        if spec.data.files:
            datastore.attach(storage.engine, optuna_private.study_id(study), _data_files(spec))
        study.set_user_attr(SPEC_ATTR, spec.to_dict())
        if text is not None:
            study.set_user_attr(SPEC_TEXT_ATTR, text)
        storage.set_study_system_attr(optuna_private.study_id(study), provenance.ATTR,
                                      provenance.record(spec.families, spec.data.source))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(spec.metric_names)
        storage.set_study_system_attr(optuna_private.study_id(study), HEARTBEAT_ATTR, heartbeat.to_dict())
        storage.set_study_system_attr(optuna_private.study_id(study), CREATED_ATTR, uuid.uuid4().hex)
    except BaseException:
        # A study without its spec or data is unusable: never leave one half-created.
        delete(spec.name, storage)
        raise
    datastore.delete_unreferenced(storage.engine)  # the replaced study's, and any left by Optuna's own delete
    return study


def identity(storage: optuna.storages.RDBStorage, name: str) -> tuple[int, str | None] | None:
    """(id, creation token) of study ``name`` now, or ``None`` when there is none: a study deleted
    and created again under the same name has another token (a study from before tokens: ``None``)."""
    return study_identity(storage, name, CREATED_ATTR)


def heartbeat_of(storage: optuna.storages.BaseStorage, study_id: int) -> Heartbeat:
    """The heartbeat settings stored in the study (a study from before they were stored: the
    environment's, else the defaults)."""
    stored = storage.get_study_system_attrs(study_id).get(HEARTBEAT_ATTR)
    return Heartbeat(**stored) if stored else Heartbeat.from_env()


def open_study(name: str, storage: optuna.storages.BaseStorage | str | None = None, *,
               seed_offset: int = 0) -> tuple[optuna.Study, StudySpec]:
    """Study ``name`` and its spec, with the spec's sampler (seeded ``seed_offset`` past the spec's
    seed: ``hpo.training.seeds.sampler_seed_offset``) and pruner.

    Args:
        storage: an open store, or its URL (None: ``HPO_STORAGE``, else the default store).

    Raises:
        StoreError: the store cannot be opened, or it has no such study (listing the ones there are).
        SpecError: the study was not created by hpo.
    """
    if storage is None or isinstance(storage, str):
        from hpo.store.storage import open_storage
        storage = open_storage(storage, heartbeat=False)
    sid = study_id(storage, name)
    raw = storage.get_study_user_attrs(sid).get(SPEC_ATTR)
    if raw is None:
        raise SpecError(f"study {name!r} has no hpo spec (it was not created by hpo create-study)")
    provenance.check_installed(storage.get_study_system_attrs(sid).get(provenance.ATTR), study=name)
    spec = parse_spec(_upgraded(raw), source=f"study {name!r} (stored spec)")
    study = optuna.load_study(study_name=name, storage=storage, sampler=build_sampler(spec, seed_offset=seed_offset),
                              pruner=build_pruner(spec))
    return study, spec


def _upgraded(raw: dict) -> dict:
    """A stored spec in today's form. Specs stored by earlier versions list every sampler and
    pruner setting, whatever the kind; only the chosen kind's are kept (the others were never used)."""
    raw = copy.deepcopy(raw)
    for section, settings in (("sampler", SAMPLER_SETTINGS), ("pruner", PRUNER_SETTINGS)):
        d = raw.get(section)
        if isinstance(d, dict) and d.get("kind") in settings:
            raw[section] = {k: v for k, v in d.items() if k == "kind" or k in settings[d["kind"]]}
    return raw


def create_from_file(spec: str, *, storage_url: str | None = None, force: bool = False,
                     heartbeat: Heartbeat | None = None) -> tuple[optuna.Study, StudySpec, list[str]]:
    """``hpo create-study``: validate the spec file ``spec`` (a name in ``studies/`` or a YAML
    path), check that its sampler, pruner and (for a CNN) layers can be built, then create the study
    with its data in the store at ``storage_url``. Nothing is written when a check fails.

    Returns:
        The study, its spec, and warnings to show (e.g. CNN configurations that never fit).

    Raises:
        SpecError, DataError, StoreError: one line naming the file, the field, the value and what
            is allowed; or the store's problem.
    """
    from hpo.data.arrays import store_arrays
    from hpo.data.cache import cache_dir
    from hpo.data.tables import embed_csv
    from hpo.store.storage import open_storage

    path = find_spec_file(spec)
    parsed = load_spec_file(path)
    check_buildable(parsed, source=str(path))  # before the data are read and the store opened: a refusal leaves nothing
    parsed = store_arrays(embed_csv(parsed), cache=cache_dir())
    if parsed.cv is not None and parsed.data.source == "csv":
        from hpo.search.cv import check_folds_fit  # torch: only CV studies pay its import

        check_folds_fit(parsed, source=str(path))
    warnings = []
    images = parsed.data.source in ("fashion_mnist", "mnist") or len(
        (parsed.data.files or {}).get("arrays", {}).get("shape", [])) == 3
    for name in parsed.families:
        family, one = registry.family(name), parsed.for_family(name)
        if family.check is not None:
            warning = family.check(one)  # the built-in cnn's: raises when no configuration fits the images
            warnings += [warning] if warning else []
        if family.image_input and not images:
            raise SpecError(f"{path}: model: {name} takes images (channels, height, width); "
                            f"data.source {parsed.data.source} gives rows of features")
    study = create(parsed, open_storage(storage_url, heartbeat=False), force=force, heartbeat=heartbeat,
                   source=str(path), text=path.read_text())
    return study, parsed, warnings
