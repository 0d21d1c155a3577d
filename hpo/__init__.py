"""hpo: hyperparameter studies for PyTorch on Optuna."""

__version__ = "0.1.0"


def load(path, *, fold=None, device="cpu", ensemble=None):
    """Load a model exported by ``hpo export-best`` (see ``hpo.export.loading.load``); torch is imported
    only here, so ``import hpo`` stays instant."""
    from hpo.export.loading import load as _load

    return _load(path, fold=fold, device=device, ensemble=ensemble)
