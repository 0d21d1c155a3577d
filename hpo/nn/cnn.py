"""The CNN builder (LeNet-5 family and beyond) and the shape check that a spec's layers fit the image.

A conv block is conv -> [batch-norm] -> activation -> pooling (``max``/``avg``: a 2x2 pool,
``stride2``: the block's conv itself has stride 2). ``padding`` given as one number pads the
first conv only, the LeNet-5 convention (28x28 input padded to the original 32x32, later convs
'valid'); a list gives every conv its own. After the conv stack: flatten, ``conv_dropout``, then
``n_dense`` hidden layers of ``dense_width[i]`` units, activation and ``dropout[i]``, then the output.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from torch import nn

from hpo.errors import SpecError, TrainingError
from hpo.nn.layers import activation, init_weights, per_layer
from hpo.spec.hyperparams import DEFAULTS
from hpo.spec.schema import StudySpec

IMAGE_SHAPES = {"fashion_mnist": (1, 28, 28), "mnist": (1, 28, 28)}


def _paddings(value: Any, n: int) -> list[int]:
    if isinstance(value, (list, tuple)):
        return [int(p) for p in per_layer(value, n, "padding")]
    return [int(value)] + [0] * (n - 1)


def _conv_geometry(hp: dict[str, Any], n: int) -> tuple[int, int, list[int]]:
    """Kernel size, conv stride and per-block padding: one source for the shape check and the builder."""
    return int(hp["kernel_size"]), 2 if hp["pooling"] == "stride2" else 1, _paddings(hp["padding"], n)


def conv_shapes(hp: dict[str, Any], *, in_shape: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """The (channels, height, width) after each conv block.

    Raises:
        TrainingError: one line naming the block when a kernel is larger than its (padded) input
            or the image shrinks below 1x1.
    """
    if len(in_shape) != 3:
        raise TrainingError(f"model cnn needs image input (channels, height, width), got shape {tuple(in_shape)}")
    n = int(hp["n_conv"])
    filters = per_layer(hp["filters"], n, "filters")
    k, stride, paddings = _conv_geometry(hp, n)
    pooling = hp["pooling"]
    _, h, w = in_shape
    shapes = []
    for i in range(n):
        p = paddings[i]
        if k > min(h, w) + 2 * p:
            raise TrainingError(f"cnn: conv block {i + 1} has kernel_size {k} but its input is {h}x{w} "
                                f"(padding {p}): use fewer conv blocks (n_conv={n}), a smaller kernel or more padding")
        h, w = (h + 2 * p - k) // stride + 1, (w + 2 * p - k) // stride + 1
        if pooling in ("max", "avg"):
            h, w = h // 2, w // 2
        if h < 1 or w < 1:
            raise TrainingError(f"cnn: conv block {i + 1} ({pooling} pooling) shrinks the image below 1x1: "
                                f"use fewer conv blocks (n_conv={n}), a smaller kernel or more padding")
        shapes.append((int(filters[i]), h, w))
    return shapes


def build_cnn(hp: dict[str, Any], *, in_shape: tuple[int, ...], out_features: int) -> nn.Sequential:
    """A CNN from resolved hyperparameters (see the module docstring for the layout).

    Raises:
        TrainingError: when the layers do not fit the input image.
    """
    shapes = conv_shapes(hp, in_shape=in_shape)
    k, stride, paddings = _conv_geometry(hp, len(shapes))
    pooling, bn = hp["pooling"], bool(hp["batch_norm"])
    layers: list[nn.Module] = []
    channels = in_shape[0]
    for (filters, _, _), p in zip(shapes, paddings):
        layers.append(nn.Conv2d(channels, filters, k, stride=stride, padding=p, bias=not bn))
        if bn:
            layers.append(nn.BatchNorm2d(filters))
        layers.append(activation(hp["activation"]))
        if pooling == "max":
            layers.append(nn.MaxPool2d(2))
        elif pooling == "avg":
            layers.append(nn.AvgPool2d(2))
        channels = filters
    layers.append(nn.Flatten())
    if float(hp["conv_dropout"]) > 0:
        layers.append(nn.Dropout(float(hp["conv_dropout"])))
    fan_in = math.prod(shapes[-1]) if shapes else math.prod(in_shape)
    n_dense = int(hp["n_dense"])
    for width, p in zip(per_layer(hp["dense_width"], n_dense, "dense_width"), per_layer(hp["dropout"], n_dense, "dropout")):
        layers += [nn.Linear(fan_in, int(width)), activation(hp["activation"])]
        if float(p) > 0:
            layers.append(nn.Dropout(float(p)))
        fan_in = int(width)
    layers.append(nn.Linear(fan_in, out_features))
    model = nn.Sequential(*layers)
    init_weights(model, hp["init"], hp["activation"])
    return model


def _extremes(spec: StudySpec, name: str, default: Any) -> list:
    """The values of ``name`` that matter for the image size: both ends of a range, every choice."""
    for p in spec.space:
        if p.name == name:
            return list(p.choices) if p.kind == "choice" else [int(p.low), int(p.high)]
    return [spec.fixed.get(name, default)]


def check_cnn_spec(spec: StudySpec) -> str | None:
    """Check at create-study that a CNN spec's conv layers fit its images.

    Shrinking grows with n_conv and kernel_size and falls with padding, so the ends of their ranges
    (and every pooling choice) decide: when none of those fits, no configuration does.

    Returns:
        None when every configuration fits, else a warning naming one that does not (such trials
        will FAIL with that reason; the others run).

    Raises:
        SpecError: when the model is a CNN on non-image data, or no configuration fits.
    """
    if spec.model != "cnn":
        return None
    in_shape = IMAGE_SHAPES.get(spec.data.source)
    stored = (spec.data.files or {}).get("arrays", {}).get("shape", [])
    if in_shape is None and len(stored) == 3:  # images of a registry source (hpo.data.arrays)
        in_shape = tuple(stored)
    if in_shape is None:
        raise SpecError(f"model: cnn needs an image data source ({', '.join(IMAGE_SHAPES)}), got data.source {spec.data.source!r}")
    names = ("n_conv", "kernel_size", "padding", "pooling")
    fits, failures = False, []
    for values in itertools.product(*(_extremes(spec, name, DEFAULTS[name]) for name in names)):
        hp = dict(zip(names, values))
        hp["filters"] = 1  # only the spatial size matters here
        try:
            conv_shapes(hp, in_shape=in_shape)
            fits = True
        except TrainingError as e:
            failures.append(str(e))
    if not fits:
        raise SpecError(f"space/fixed: no configuration fits a {in_shape[1]}x{in_shape[2]} image; e.g. {failures[0]}")
    return f"some configurations do not fit the image and will fail: {failures[0]}" if failures else None
