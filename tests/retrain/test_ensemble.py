"""Ensembles on hand-made predictions: majority vote with its tie-break, soft vote, mean."""

import pytest
import torch

from hpo.retrain import ensemble


def logits_for(classes: list[list[int]], n_classes: int = 3) -> torch.Tensor:
    """(K, N, C) logits whose argmax is ``classes[k][n]`` (confidence 2 for the pick, 0 elsewhere)."""
    out = torch.zeros(len(classes), len(classes[0]), n_classes)
    for k, row in enumerate(classes):
        for n, c in enumerate(row):
            out[k, n, c] = 2.0
    return out


def test_majority_vote_takes_the_most_common_class():
    logits = logits_for([[0, 1, 2, 2], [0, 1, 1, 2], [1, 1, 2, 0]])
    assert ensemble.majority_vote(logits, tie_breaker=2).tolist() == [0, 1, 2, 2]


def test_ties_go_to_the_best_model_when_its_class_is_tied():
    # sample 0: votes 0,1 (tie); sample 1: votes 2,1 (tie)
    logits = logits_for([[0, 2], [1, 1]])
    assert ensemble.majority_vote(logits, tie_breaker=0).tolist() == [0, 2]
    assert ensemble.majority_vote(logits, tie_breaker=1).tolist() == [1, 1]


def test_tie_without_the_best_models_class_uses_its_ranking_of_the_tied_classes():
    # votes: 0, 0, 1, 1, 2 -> classes 0 and 1 tie; the best model (index 4) voted 2 but ranks 1 above 0
    logits = logits_for([[0], [0], [1], [1], [2]])
    logits[4, 0] = torch.tensor([0.1, 0.5, 3.0])
    assert ensemble.majority_vote(logits, tie_breaker=4).tolist() == [1]
    logits[4, 0] = torch.tensor([0.9, 0.5, 3.0])
    assert ensemble.majority_vote(logits, tie_breaker=4).tolist() == [0]


def test_tie_breaker_must_name_a_model():
    with pytest.raises(ValueError, match="tie_breaker"):
        ensemble.majority_vote(logits_for([[0], [1]]), tie_breaker=2)


def test_soft_vote_is_the_mean_probability_and_can_differ_from_the_majority():
    # two models weakly prefer class 0, one strongly prefers class 1
    logits = torch.tensor([[[0.2, 0.0]], [[0.2, 0.0]], [[0.0, 5.0]]])
    soft = ensemble.soft_vote(logits)
    expected = torch.softmax(logits, -1).mean(0)
    assert torch.allclose(soft, expected)
    assert torch.allclose(soft.sum(-1), torch.ones(1))
    assert soft.argmax(-1).tolist() == [1]
    assert ensemble.majority_vote(logits, tie_breaker=0).tolist() == [0]


def test_mean_of_regression_outputs():
    outputs = torch.tensor([[[1.0], [2.0]], [[3.0], [6.0]]])
    assert ensemble.mean(outputs).tolist() == [[2.0], [4.0]]


def test_exported_majority_vote_predict_follows_the_tie_breaker_forward_gives_shares():
    from hpo.export.loading import ExportedModel

    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = torch.tensor([logits])

        def forward(self, x):
            return self.logits.expand(len(x), -1)

    models = [Fixed([0.0, 1.0, 5.0]), Fixed([5.0, 1.0, 0.0])]  # fold 0 votes 2, fold 1 votes 0: a tie
    model = ExportedModel(models, description={"task": "classification", "in_shape": [1], "tie_breaker": 0},
                          rule="majority_vote").eval()
    x = torch.zeros(1, 1)
    shares = model(x)
    assert shares.tolist() == [[0.5, 0.0, 0.5]] == ensemble.vote_shares(model.fold_outputs(x)).tolist()
    assert model.predict(x).tolist() == [2]  # the best-on-validation fold (0) breaks the tie
    assert shares.argmax(-1).tolist() == [0]  # documented: argmax of the shares takes the lowest tied index
