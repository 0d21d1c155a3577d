import pytest
import torch
from torch import nn

from hpo.nn.models import build_model
from hpo.spec.hyperparams import ACTIVATIONS, INITS, resolve


def mlp(**hp):
    return build_model("mlp", resolve(hp), in_shape=(1,), out_features=1)


@pytest.mark.parametrize("widths", [[7], [5, 3], [4, 4, 2]])
def test_mlp_shapes_and_parameter_count(widths):
    model = mlp(n_layers=len(widths), width=widths)
    sizes = [1, *widths, 1]
    expected = sum(a * b + b for a, b in zip(sizes, sizes[1:]))  # weights + biases per Linear
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model(torch.randn(9, 1)).shape == (9, 1)


def test_mlp_flattens_images():
    model = build_model("mlp", resolve({"n_layers": 2, "width": [480, 132]}), in_shape=(1, 28, 28), out_features=10)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert sum(p.numel() for p in model.parameters()) == 784 * 480 + 480 + 480 * 132 + 132 + 132 * 10 + 10


def test_per_layer_dropout_and_activation():
    model = mlp(n_layers=2, width=[8, 8], dropout=[0.0, 0.3], activation="tanh")
    dropouts = [m.p for m in model if isinstance(m, nn.Dropout)]
    assert dropouts == [0.3]
    assert sum(isinstance(m, nn.Tanh) for m in model) == 2


def test_width_list_must_match_layer_count():
    from hpo.errors import TrainingError

    with pytest.raises(TrainingError, match=r"width has 2 values for 3 layers"):
        mlp(n_layers=3, width=[8, 8])


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_builds(activation):
    assert mlp(activation=activation)(torch.randn(2, 1)).shape == (2, 1)


@pytest.mark.parametrize("init", INITS)
def test_init_schemes(init):
    torch.manual_seed(0)
    model = mlp(n_layers=2, width=[64, 64], init=init)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    weights = torch.cat([m.weight.flatten() for m in linears])
    if init == "zero":
        assert torch.count_nonzero(weights) == 0
        assert all(torch.count_nonzero(m.bias) == 0 for m in linears)
    elif init == "normal":
        assert weights.std().item() == pytest.approx(0.01, rel=0.15)
    elif init == "glorot":
        w = linears[1].weight  # 64 -> 64: bound sqrt(6 / 128)
        assert w.abs().max().item() <= (6 / 128) ** 0.5 + 1e-6
        assert w.std().item() == pytest.approx((2 / 128) ** 0.5, rel=0.1)
    elif init == "kaiming":
        assert linears[1].weight.std().item() == pytest.approx((2 / 64) ** 0.5, rel=0.1)
    elif init == "default":  # PyTorch's own: the very weights nn.Linear draws from the same seed, biases too
        torch.manual_seed(0)
        reference = [nn.Linear(1, 64), nn.Linear(64, 64), nn.Linear(64, 1)]
        assert all(torch.equal(m.weight, r.weight) and torch.equal(m.bias, r.bias) for m, r in zip(linears, reference))
        assert all(torch.count_nonzero(m.bias) > 0 for m in linears)
    else:
        raise AssertionError(f"init scheme {init!r} has no check here")
    if init != "default":
        assert all(torch.count_nonzero(m.bias) == 0 for m in linears[1:])


def test_mlp_gradients_match_finite_differences():
    torch.manual_seed(0)
    model = mlp(n_layers=2, width=[5, 4], activation="tanh").double()
    x = torch.randn(6, 1, dtype=torch.float64)
    y = torch.randn(6, 1, dtype=torch.float64)
    params = tuple(p.detach().requires_grad_() for p in model.parameters())
    names = [n for n, _ in model.named_parameters()]

    def loss(*ps):
        out = torch.func.functional_call(model, dict(zip(names, ps)), (x,))
        return ((out - y) ** 2).mean()

    assert torch.autograd.gradcheck(loss, params, eps=1e-6, atol=1e-5)


def test_activation_per_layer_as_the_regression_seed_has_it():
    model = mlp(n_layers=2, width=[8, 8], activation=["selu", "sigmoid"])
    assert [type(m) for m in model if not isinstance(m, (nn.Linear, nn.Flatten))] == [nn.SELU, nn.Sigmoid]
    from hpo.errors import TrainingError

    with pytest.raises(TrainingError, match=r"activation has 1 values for 2 layers"):
        mlp(n_layers=2, width=[8, 8], activation=["selu"])
