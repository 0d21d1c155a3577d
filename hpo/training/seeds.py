"""Every seed hpo derives from a spec's ``seed``, in one place, each with the reason for its formula.

A study is reproducible from ``spec.seed`` alone: the data split (``hpo.data.splits``) uses it as
it is, and everything below is a fixed function of it. Checkpoints and resumed runs rely on these
values staying bit-identical from one version of hpo to the next: change a formula and an old
checkpoint resumes with another batch order.
"""

from __future__ import annotations

TRIAL_STRIDE = 1_000_003  # a prime above any study's trial count: (seed, trial) pairs never collide
FOLD_STRIDE = 100  # above any fold count: (trial seed, fold) pairs never collide
WORKER_INDEX_STRIDE = 10_007  # a prime above any worker count of one study: (number, index) never collide


def trial_seed(study_seed: int, lineage: int) -> int:
    """torch's seed for trial lineage ``lineage`` (the number of the original trial, so that a
    retry trains as its original did): its weights' initialisation and batch order."""
    return study_seed * TRIAL_STRIDE + lineage


def fold_seed(trial_seed: int, fold: int) -> int:
    """The seed of fold model ``fold`` of a retrain of the trial seeded ``trial_seed``: each fold
    model gets its own initial weights and batch order, and a retrain is the same every time."""
    return trial_seed * FOLD_STRIDE + fold


def sampler_seed_offset(worker_number: int, worker_index: int) -> int:
    """What a worker adds to the spec's seed for its sampler: its number in the store (taken when it
    starts, so concurrently started workers draw different points and the first worker of a fresh
    study uses the spec's seed) plus ``WORKER_INDEX_STRIDE`` times its ``--worker-index``
    (``hpo launch`` gives each array task its own). Grid studies ignore it
    (``hpo.search.study.build_sampler``)."""
    return worker_number + WORKER_INDEX_STRIDE * worker_index


def sampler_seed(study_seed: int, offset: int) -> int:
    """The random and TPE samplers' seed for a worker with ``offset`` (:func:`sampler_seed_offset`)."""
    return study_seed + offset


def batch_reseed(seed: int, epoch: int) -> int:
    """The batch-order generator's seed when a run seeded ``seed`` resumes at ``epoch`` from a
    checkpoint written on another kind of device (its saved generator state does not fit): a batch
    order of its own for the rest of the run, the same on every such resume."""
    return seed + epoch
