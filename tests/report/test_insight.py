"""Model-insight figures (hpo.report.insight)."""

import torch

from hpo.nn.models import build_model
from hpo.report.insight import activation_profiles


def test_activation_profiles_are_inputs_by_units_heatmaps():
    torch.manual_seed(0)
    hp = {"n_layers": 2, "width": [16, 8], "dropout": 0.0, "activation": "relu", "init": "default"}
    model = build_model("mlp", hp, in_shape=(1,), out_features=1).eval()
    labels = [f"x = {v}" for v in range(5)]
    fig = activation_profiles(model, torch.linspace(-1.5, 1.5, 5)[:, None], labels)
    assert [t.type for t in fig.data] == ["heatmap", "heatmap"]
    assert [t.z.shape for t in fig.data] == [(5, 16), (5, 8)]  # a row per input, a column per unit
    assert list(fig.data[0].y) == labels
    for t in fig.data:  # units sorted by mean activation over the inputs
        means = t.z.mean(axis=0)
        assert all(means[:-1] >= means[1:])
    assert fig.data[0].coloraxis != fig.data[1].coloraxis  # each layer its own colour scale
