"""The seeds hpo derives from a spec's seed keep their values: checkpoints written by one version
resume in the next only if a trial's, a fold's and a resumed batch order's seeds stay the same."""

from hpo.training import seeds


def test_derived_seeds_keep_their_values():
    assert seeds.trial_seed(3, 0) == 3_000_009 and seeds.trial_seed(3, 7) == 3_000_016
    assert seeds.fold_seed(seeds.trial_seed(3, 7), 4) == 300_001_604
    assert seeds.sampler_seed_offset(2, 0) == 2 and seeds.sampler_seed_offset(2, 3) == 30_023
    assert seeds.sampler_seed(3, seeds.sampler_seed_offset(0, 0)) == 3  # a fresh study's first worker: the spec's seed
    assert seeds.batch_reseed(300_001_604, 12) == 300_001_616


def test_no_two_trials_or_folds_share_a_seed():
    trials = {seeds.trial_seed(s, n) for s in range(5) for n in range(1000)}
    assert len(trials) == 5000
    folds = {seeds.fold_seed(t, i) for t in sorted(trials)[:200] for i in range(20)}
    assert len(folds) == 4000
    workers = {seeds.sampler_seed_offset(n, i) for n in range(100) for i in range(50)}
    assert len(workers) == 5000
