"""hpo: hyperparameter studies for PyTorch on Optuna."""

__version__ = "0.1.0"
