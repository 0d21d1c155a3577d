"""Looking inside the retrained models: weight histograms, CNN filters and feature maps, MLP
receptive fields and activation-maximisation images, regression activation profiles.

Models are rebuilt from a retrain's ``model.json`` and ``fold_<i>.pt``. Each figure function
returns a plotly figure; weights are binned here, never shipped raw to the page.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import nn

from hpo.nn.layers import ACTIVATIONS
from hpo.nn.models import rebuild

MAX_TILES = 16
NEURONS_PER_LAYER = 8


def load_fold_model(folder: Path, fold: int) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild fold ``fold``'s model from a retrain folder; returns it (eval mode, CPU) and model.json."""
    info = json.loads((folder / "model.json").read_text())
    return rebuild(info, folder / f"fold_{fold}.pt"), info


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def weight_histograms(model: nn.Module, *, bins: int = 60) -> go.Figure:
    """One histogram per Linear/Conv layer's weights (binned here)."""
    layers = _layers(model)
    cols = min(len(layers), 3)
    rows = math.ceil(len(layers) / cols)
    titles = [f"{name} {type(m).__name__} {tuple(m.weight.shape)}" for name, m in layers]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles)
    for i, (_, m) in enumerate(layers):
        counts, edges = np.histogram(m.weight.detach().cpu().numpy().ravel(), bins=bins)
        fig.add_trace(go.Bar(x=(edges[:-1] + edges[1:]) / 2, y=counts, width=np.diff(edges), showlegend=False,
                             marker_color="#1f77b4", hovertemplate="%{x:.3g}: %{y}<extra></extra>"),
                      row=i // cols + 1, col=i % cols + 1)
    fig.update_layout(title="Weights of each layer", height=300 * rows, bargap=0)
    return fig


def image_grid(rows: list[list[np.ndarray | None]], titles: list[list[str]], *, title: str,
               colorscale: str = "RdBu", symmetric: bool = True) -> go.Figure:
    """Small heatmaps in a grid (filters, feature maps, receptive fields): one list per row, ``None``
    for an empty cell. Each tile keeps its own shape, so maps of different sizes share one grid."""
    cols = max(len(r) for r in rows)
    flat_titles = [t for r, ts in zip(rows, titles) for t in (list(ts) + [""] * (cols - len(r)))]
    fig = make_subplots(rows=len(rows), cols=cols, subplot_titles=flat_titles, horizontal_spacing=0.01,
                        vertical_spacing=0.1 / max(len(rows), 1))
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            if img is None:
                continue
            limit = float(np.nanmax(np.abs(img))) or 1.0
            bounds = dict(zmin=-limit, zmax=limit, zmid=0) if symmetric else {}
            fig.add_trace(go.Heatmap(z=img, colorscale=colorscale, showscale=False, **bounds,
                                     hovertemplate="%{z:.3g}<extra></extra>"), row=i + 1, col=j + 1)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, autorange="reversed")
    for name in list(fig.layout):
        if name.startswith("yaxis"):
            # Each tile keeps its own aspect: anchor every y axis to its own x axis.
            fig.layout[name].scaleanchor = "x" + name[len("yaxis"):]
    fig.update_annotations(font_size=10)
    # Square tiles on a ~1100 px wide page, plus room for the tile titles.
    fig.update_layout(title=title, height=len(rows) * (1100 // cols + 30) + 70, margin=dict(l=10, r=10, t=70, b=10))
    return fig


def _chunks(items: list, titles: list[str], size: int) -> tuple[list[list], list[list[str]]]:
    return ([items[i:i + size] for i in range(0, len(items), size)],
            [titles[i:i + size] for i in range(0, len(titles), size)])


def first_layer_filters(model: nn.Module) -> go.Figure:
    """The first conv layer's filters (averaged over input channels)."""
    conv = next(m for _, m in _layers(model) if isinstance(m, nn.Conv2d))
    w = list(conv.weight.detach().cpu().numpy().mean(axis=1)[:MAX_TILES * 2])
    return image_grid(*_chunks(w, [f"filter {i}" for i in range(len(w))], 8), title="First-layer filters")


@torch.no_grad()
def feature_maps(model: nn.Module, image: torch.Tensor, *, per_block: int = 8) -> go.Figure:
    """The test image, then a row per conv layer with the first channels of its output."""
    outputs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: outputs.append(out[0]))
             for _, m in _layers(model) if isinstance(m, nn.Conv2d)]
    try:
        model(image[None])
    finally:
        for h in hooks:
            h.remove()
    rows: list[list] = [[image.mean(0).numpy()]]
    titles = [["test image"]]
    for block, out in enumerate(outputs, start=1):
        maps = out[:per_block].numpy()
        rows.append(list(maps))
        titles.append([f"conv {block} ({out.shape[1]}×{out.shape[2]}) ch {c}" if c == 0 else f"ch {c}" for c in range(len(maps))])
    return image_grid(rows, titles, title="Feature maps of one test image, per conv layer",
                      colorscale="Viridis", symmetric=False)


def receptive_fields(model: nn.Module, in_shape: tuple[int, ...], classes: list[str], *, seed: int = 0) -> go.Figure:
    """Products of the weight matrices (W_k ··· W_1, ignoring the nonlinearities, as the seed did)
    for sampled neurons of each hidden layer (a row each) and every output neuron, shown as images."""
    linears = [m for _, m in _layers(model) if isinstance(m, nn.Linear)]
    rng = np.random.default_rng(seed)
    product = None
    rows, titles = [], []
    for depth, layer in enumerate(linears, start=1):
        w = layer.weight.detach().cpu().double()
        product = w if product is None else w @ product
        if depth == len(linears):
            picks = np.arange(min(len(product), 20))
            names = [f"out {_label(classes, j)}" for j in picks]
        else:
            picks = np.sort(rng.choice(len(product), size=min(NEURONS_PER_LAYER, len(product)), replace=False))
            names = [f"layer {depth} n{j}" for j in picks]
        chunk_rows, chunk_titles = _chunks([product[j].reshape(in_shape).mean(0).numpy() for j in picks], names, 10)
        rows += chunk_rows
        titles += chunk_titles
    return image_grid(rows, titles, title="Receptive fields (products of weight matrices)")


def _label(classes: list[str], i: int) -> str:
    return str(classes[i]) if i < len(classes) else str(i)


def activation_maximisation(model: nn.Module, in_shape: tuple[int, ...], classes: list[str], *, steps: int = 150,
                            lr: float = 0.1, l2: float = 1e-2) -> go.Figure:
    """Inputs that maximise each output neuron, by gradient ascent on the input from a blank image."""
    n_out = _layers(model)[-1][1].weight.shape[0]
    x = torch.zeros((n_out, *in_shape), requires_grad=True)
    rows = torch.arange(n_out)
    for p in model.parameters():
        p.requires_grad_(False)
    # Plain normalised ascent steps: torch.optim would pull in torch._dynamo (seconds of import).
    for _ in range(steps):
        objective = model(x)[rows, rows].sum() - l2 * (x ** 2).sum()
        (grad,) = torch.autograd.grad(objective, x)
        with torch.no_grad():
            x += lr * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * len(in_shape))
    images = list(x.detach().mean(1).numpy())
    return image_grid(*_chunks(images, [_label(classes, i) for i in range(n_out)], 10),
                      title="Activation maximisation: input that most excites each output neuron")


@torch.no_grad()
def activation_profiles(model: nn.Module, inputs: torch.Tensor, labels: list[str]) -> go.Figure:
    """Each hidden layer's activations (after the nonlinearity) as a heatmap: a row per input, a
    column per unit, units sorted by their mean activation over these inputs (unit indices carry
    no order, so lines across them would draw a meaningless zig-zag). Each layer has its own colour
    scale, with its colour bar beside it."""
    acts: list[tuple[str, torch.Tensor]] = []
    kinds = tuple(ACTIVATIONS.values())
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: acts.append((name, out)))
             for name, m in model.named_modules() if isinstance(m, kinds)]
    try:
        model(inputs)
    finally:
        for h in hooks:
            h.remove()
    rows = len(acts)
    plot_px, gap_px = 220, 70  # each layer's heatmap; the room between two for the next layer's title
    total_px = rows * plot_px + (rows - 1) * gap_px
    gap = gap_px / total_px if rows > 1 else 0.0
    fig = make_subplots(rows=rows, cols=1, vertical_spacing=gap,
                        subplot_titles=[f"hidden layer {i} ({out.shape[1]} units)" for i, (_, out) in
                                        enumerate(acts, start=1)])
    for row, (_, out) in enumerate(acts, start=1):
        order = torch.argsort(out.mean(0), descending=True)
        axis = "coloraxis" if row == 1 else f"coloraxis{row}"
        fig.add_trace(go.Heatmap(z=out[:, order].numpy(), x=np.arange(out.shape[1]), y=labels, coloraxis=axis,
                                 hovertemplate="%{y}, unit rank %{x}: %{z:.3g}<extra></extra>"), row=row, col=1)
        # The colour bar beside its own layer: the subplots split the height evenly, top first.
        height = (1 - gap * (rows - 1)) / rows
        fig.layout[axis] = dict(colorscale="Viridis", colorbar=dict(
            title="activation", len=height, y=1 - (row - 1) * (height + gap) - height / 2, yanchor="middle"))
    # The axis title once, under the last layer: under every layer it ran into the next one's title.
    fig.update_xaxes(title_text="unit (sorted by mean activation over these inputs)", row=rows, col=1)
    fig.update_layout(title="Activation profiles of each hidden layer: inputs × units", height=total_px + 170,
                      margin=dict(l=60, r=30, t=90, b=70))
    return fig


def _test_image(spec, storage) -> torch.Tensor:
    from hpo.data.sources import load_dataset

    return load_dataset(spec, storage=storage).x_test[0].float().cpu()


def insight_section(page, folder: Path, metrics: dict[str, Any], spec, *, storage=None) -> None:
    """The model-insight section: the best fold's model, rebuilt from the retrain folder.

    ``page`` is a ``hpo.report.html.Page``; ``storage`` the study's store (for a test image).
    """
    sec = page.section("insight", "Model insight")
    fold = int(metrics.get("best_fold") or 0)
    try:
        model, info = load_fold_model(folder, fold)
    except Exception as e:
        sec.parts.append(page.note(f"the model of fold {fold} cannot be rebuilt ({type(e).__name__}: {e}); "
                                   f"run: hpo retrain --study {spec.name}"))
        return
    in_shape = tuple(info["in_shape"])
    n_params = sum(p.numel() for p in model.parameters())
    sec.parts.append(f"<p>The best fold model (fold {fold}): {info['family']}, input {in_shape}, "
                     f"{info['out_features']} outputs, {n_params:,} parameters.</p>")
    sec.parts.append(page.figure(lambda: weight_histograms(model), "weight histograms"))
    if any(isinstance(m, nn.Conv2d) for m in model.modules()):
        sec.parts.append(page.figure(lambda: first_layer_filters(model), "first-layer filters"))
        sec.parts.append(page.figure(lambda: feature_maps(model, _test_image(spec, storage)), "feature maps"))
    elif len(in_shape) == 3:
        sec.parts.append(page.figure(lambda: receptive_fields(model, in_shape, info.get("classes") or []), "receptive fields"))
        sec.parts.append(page.figure(lambda: activation_maximisation(model, in_shape, info.get("classes") or []), "activation maximisation"))
    elif info.get("task") == "regression" and len(in_shape) == 1 and in_shape[0] == 1:
        sec.parts.append(page.figure(lambda: _regression_profiles(model, info), "activation profiles"))


def _regression_profiles(model: nn.Module, info: dict[str, Any]) -> go.Figure:
    norm = info.get("normalization") or {}
    mean, std = float((norm.get("mean") or [0.0])[0]), float((norm.get("std") or [1.0])[0])
    z = torch.linspace(-1.5, 1.5, 5)  # normalised inputs across the bulk of the training data
    labels = [f"x = {float(v) * std + mean:.3g}" for v in z]
    return activation_profiles(model, z[:, None], labels)
