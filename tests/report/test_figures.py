"""Retrain figures drawn from a retrain's files (hpo.report.figures)."""

import numpy as np

from hpo.report.figures import learning_curves


def test_learning_curve_band_stays_above_zero_on_its_log_axis():
    # Folds far apart: mean - std < 0 at every epoch, which a log axis cannot draw.
    folds = [{"train_loss": list(np.full(20, low)), "val_loss": list(np.linspace(1.0, 0.5, 20) * low)}
             for low in (0.01, 0.02, 3.0)]
    fig = learning_curves({"folds": folds})
    bands = [t for t in fig.data if t.name.endswith("± std")]
    assert len(bands) == 2 and fig.layout.yaxis.type == "log"
    for band, key in zip(bands, ("train_loss", "val_loss")):
        lowest = min(v for f in folds for v in f[key])
        assert np.min(band.y) == lowest > 0  # clipped at the lowest loss a fold reached
        assert np.max(band.y) > 1.0  # the upper edge is untouched
