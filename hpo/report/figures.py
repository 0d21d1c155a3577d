"""Figures of one retrain, drawn from its files (see ``hpo.retrain.results``): per-fold scores, learning
curves, confusion matrices and the regression fit. Each function returns a plotly figure.

Inputs are cut down before they go in (curves to a few hundred points per line), so a 10-fold
retrain of hundreds of epochs stays a few hundred kilobytes in the page.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

MAX_CURVE_POINTS = 300
ENSEMBLE_STYLE = {"mean": ("ensemble mean", "#2ca02c"), "majority_vote": ("majority vote", "#d62728"),
                  "soft_vote": ("soft vote", "#9467bd")}


def thin(n: int, limit: int = MAX_CURVE_POINTS) -> np.ndarray:
    """Indices of at most ``limit`` evenly spread points of ``n``, keeping the last one."""
    if n <= limit:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(int))


def fold_scores(metrics: dict[str, Any], metric_name: str) -> go.Figure:
    """Test metric and test loss of each fold model, the best fold highlighted and the ensembles
    drawn as horizontal lines across the bars."""
    per_fold = metrics["per_fold"]
    best = metrics.get("best_fold")
    ensemble = metrics.get("ensemble", {})
    panels = [("test_metric", f"test {metric_name}")]
    # Regression scores by MSE, which is its loss too: one panel then.
    if all(f.get("test_loss") not in (None, f["test_metric"]) for f in per_fold):
        panels.append(("test_loss", "test loss"))
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[p[1] for p in panels])
    folds = [f"fold {f['fold']}" for f in per_fold]
    colours = ["#ff7f0e" if f["fold"] == best else "#1f77b4" for f in per_fold]
    for col, (key, title) in enumerate(panels, start=1):
        values = [f[key] for f in per_fold]
        fig.add_trace(go.Bar(x=folds, y=values, marker_color=colours, name=title, showlegend=False,
                             hovertemplate="%{x}: %{y:.5g}<extra></extra>"), row=1, col=col)
        fig.add_hline(y=float(np.mean(values)), line_dash="dot", line_color="#444", row=1, col=col,
                      annotation_text="mean of folds", annotation_position="top left")
        drawn = [(float(ensemble[name][key]), label, colour) for name, (label, colour) in ENSEMBLE_STYLE.items()
                 if ensemble.get(name, {}).get(key) is not None]
        # Labels on the far side of their lines from each other (the higher line's above it, the
        # lower's below), so close or equal values never stack two labels on one spot.
        for rank, (value, label, colour) in enumerate(sorted(drawn, key=lambda d: d[0])):
            fig.add_hline(y=value, line_dash="dash", line_color=colour, row=1, col=col,
                          annotation_text=f"{label} {value:.4g}", annotation_font_color=colour,
                          annotation_position="top right" if rank == len(drawn) - 1 and rank else "bottom right")
        low, high = min(values), max(values)
        pad = (high - low) * 0.5 or abs(high) * 0.05 or 1.0
        lines = [v.get(key) for v in ensemble.values() if v.get(key) is not None]
        fig.update_yaxes(range=[min([low, *lines]) - pad, max([high, *lines]) + pad], row=1, col=col)
    title = "Test scores per fold model" + (f" (best: fold {best}, in orange)" if best is not None else "")
    fig.update_layout(title=title, height=420, bargap=0.3)
    return fig


def _stack(curves: list[dict], key: str) -> np.ndarray:
    """Folds × epochs, NaN past a fold's last epoch (early stopping ends folds at different epochs)."""
    length = max(len(c.get(key, [])) for c in curves)
    out = np.full((len(curves), length), np.nan)
    for i, c in enumerate(curves):
        values = np.asarray(c.get(key, []), dtype=float)
        out[i, :len(values)] = values
    return out


def learning_curves(curves: dict[str, Any]) -> go.Figure:
    """Mean ± std of train and validation loss over folds, and each fold's validation curve, on a
    log axis. The band's lower edge is clipped at the lowest loss any fold reached: mean − std
    often falls below zero, which a log axis cannot show."""
    folds = curves["folds"]
    fig = make_subplots(rows=1, cols=2, subplot_titles=["mean ± std over folds", "validation loss of each fold"])
    palette = {"train_loss": "#1f77b4", "val_loss": "#ff7f0e"}
    for key, colour in palette.items():
        stacked = _stack(folds, key)
        if stacked.size == 0:
            continue
        idx = thin(stacked.shape[1])
        epochs = idx + 1
        with np.errstate(all="ignore"):
            mean, std = np.nanmean(stacked, axis=0)[idx], np.nanstd(stacked, axis=0)[idx]
        positive = stacked[stacked > 0]
        lower = np.maximum(mean - std, positive.min()) if positive.size else mean - std
        label = key.replace("_", " ")
        fig.add_trace(go.Scatter(x=np.concatenate([epochs, epochs[::-1]]),
                                 y=np.concatenate([mean + std, lower[::-1]]), fill="toself",
                                 fillcolor=colour, opacity=0.2, line_width=0, hoverinfo="skip",
                                 name=f"{label} ± std", legendgroup=key), row=1, col=1)
        fig.add_trace(go.Scatter(x=epochs, y=mean, line_color=colour, name=f"{label} (mean)", legendgroup=key),
                      row=1, col=1)
    for i, c in enumerate(folds):
        values = np.asarray(c.get("val_loss", []), dtype=float)
        idx = thin(len(values))
        fig.add_trace(go.Scatter(x=idx + 1, y=values[idx], mode="lines", name=f"fold {i} val",
                                 line_width=1.2, legendgroup="folds"), row=1, col=2)
    fig.update_xaxes(title_text="epoch")
    fig.update_yaxes(title_text="loss", type="log")
    fig.update_layout(title="Learning curves of the fold models", height=450)
    return fig


def confusion(metrics: dict[str, Any]) -> go.Figure:
    """Confusion matrices (rows: true class, columns: predicted) of the best model and the vote."""
    classes = [str(c) for c in metrics.get("classes") or []]
    matrices = {name: np.asarray(m) for name, m in metrics["confusion"].items()}
    titles = {"best": f"best model (fold {metrics.get('best_fold')})", "majority_vote": "majority vote"}
    fig = make_subplots(rows=1, cols=len(matrices), subplot_titles=[titles.get(n, n) for n in matrices],
                        horizontal_spacing=0.12)
    for col, matrix in enumerate(matrices.values(), start=1):
        labels = classes if len(classes) == len(matrix) else [str(i) for i in range(len(matrix))]
        fig.add_trace(go.Heatmap(z=matrix, x=labels, y=labels, colorscale="Blues", showscale=False,
                                 texttemplate="%{z}", hovertemplate="true %{y}, predicted %{x}: %{z}<extra></extra>"),
                      row=1, col=col)
        fig.update_xaxes(title_text="predicted", row=1, col=col)
        fig.update_yaxes(title_text="true", autorange="reversed", row=1, col=col)
    fig.update_layout(title="Confusion matrices on the test set", height=520)
    return fig


def gaps(x: np.ndarray, *, share: float = 0.08) -> list[tuple[float, float]]:
    """Intervals of x with no training data: spaces between neighbours wider than ``share`` of the
    range of x (the seeds' "dark intervals")."""
    xs = np.sort(np.asarray(x, dtype=float).ravel())
    if len(xs) < 3 or xs[-1] == xs[0]:
        return []
    wide = np.flatnonzero(np.diff(xs) > share * (xs[-1] - xs[0]))
    return [(float(xs[i]), float(xs[i + 1])) for i in wide]


def regression_fit(*, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                   grid_x: np.ndarray, grid_best: np.ndarray, grid_mean: np.ndarray,
                   best_fold: int | None) -> go.Figure:
    """Training and test points, the best fold model and the ensemble mean over a grid of x, with the
    gaps in the training data shaded."""
    fig = go.Figure()
    for lo, hi in gaps(x_train):
        fig.add_vrect(x0=lo, x1=hi, fillcolor="#333", opacity=0.15, line_width=0,
                      annotation_text="no training data", annotation_position="top left")
    fig.add_trace(go.Scatter(x=x_train.ravel(), y=y_train.ravel(), mode="markers", name="training points",
                             marker=dict(color="#1f77b4", size=6, opacity=0.7)))
    fig.add_trace(go.Scatter(x=x_test.ravel(), y=y_test.ravel(), mode="markers", name="test points",
                             marker=dict(color="#7f7f7f", size=6, symbol="x")))
    order = np.argsort(np.asarray(grid_x).ravel())
    gx = np.asarray(grid_x).ravel()[order]
    label = f"best model (fold {best_fold})" if best_fold is not None else "best model"
    fig.add_trace(go.Scatter(x=gx, y=np.asarray(grid_best).ravel()[order], mode="lines", name=label,
                             line=dict(color="#ff7f0e", width=2)))
    fig.add_trace(go.Scatter(x=gx, y=np.asarray(grid_mean).ravel()[order], mode="lines", name="ensemble mean",
                             line=dict(color="#2ca02c", width=3)))
    fig.update_layout(title="Regression fit (shaded: gaps in the training data)", xaxis_title="x",
                      yaxis_title="y", height=480)
    return fig


def _retrain_table(record, metrics: dict[str, Any], metric_name: str) -> list[tuple[str, object]]:
    rows = [("retrain", f"{record.id} (created {record.created})"), ("trial", f"#{record.trial_number}"),
            ("folds", record.folds), ("device", metrics.get("device", "not recorded")),
            ("training path", metrics.get("path", "-")),
            ("train time", f"{metrics['train_seconds']:.1f} s" if "train_seconds" in metrics else "-"),
            ("model-epochs / s", f"{metrics['model_epochs_per_s']:.3g}" if "model_epochs_per_s" in metrics else "-")]
    per_fold = metrics.get("per_fold", [])
    if per_fold:
        values = [f["test_metric"] for f in per_fold]
        rows.append((f"test {metric_name} of the fold models",
                     f"mean {np.mean(values):.5g} ± {np.std(values):.2g} (best fold {metrics.get('best_fold')})"))
    for name, (label, _) in ENSEMBLE_STYLE.items():
        value = metrics.get("ensemble", {}).get(name, {}).get("test_metric")
        if value is not None:
            rows.append((f"test {metric_name}, {label}", f"{value:.5g}"))
    return rows


def retrain_sections(page, study, spec, *, artifact_store, storage=None) -> None:
    """The retrain and model-insight sections of the report, from the study's latest retrain.

    ``page`` is a ``hpo.report.html.Page``; ``artifact_store`` a callable opening the artifact store;
    ``storage`` the study's store, where the data to plot come from (``hpo.data.sources``).
    """
    import shutil

    from hpo.errors import HpoError
    from hpo.report.insight import insight_section
    from hpo.retrain.results import fetch_files, load_retrain, read_json

    name = study.study_name
    try:
        record = load_retrain(study)
    except HpoError:
        for sid, title in (("retrain", "Retrain"), ("insight", "Model insight")):
            page.section(sid, title).parts.append(page.note(
                f"no retrain of this study yet; run: hpo retrain --study {name} (then run hpo report again)"))
        return
    try:
        folder = fetch_files(artifact_store(), record)
    except Exception as e:
        page.section("retrain", "Retrain").parts.append(page.note(
            f"the files of retrain {record.id} cannot be read from the artifact store ({type(e).__name__}: {e}); "
            f"pass --artifacts DIR (the folder hpo retrain wrote to), or run: hpo retrain --study {name}"))
        return
    try:
        metrics = read_json(folder, "metrics.json")
        metric_name = metrics.get("metric") or spec.metric.removeprefix("val_")
        sec = page.section("retrain", "Retrain")
        sec.parts.append(page.table(_retrain_table(record, metrics, metric_name)))
        sec.parts.append(page.figure(lambda: fold_scores(metrics, metric_name), "per-fold test scores"))
        sec = page.section("curves", "Learning curves")
        if (folder / "curves.json").exists():
            curves = read_json(folder, "curves.json")
            sec.parts.append(page.figure(lambda: learning_curves(curves), "learning curves"))
        else:
            sec.parts.append(page.note(f"this retrain has no curves.json; run: hpo retrain --study {name}"))
        if metrics.get("task") == "classification":
            sec = page.section("confusion", "Confusion matrices")
            if metrics.get("confusion"):
                sec.parts.append(page.figure(lambda: confusion(metrics), "confusion matrices"))
            else:
                sec.parts.append(page.note(f"this retrain recorded no confusion matrices; run: hpo retrain --study {name}"))
        else:
            sec = page.section("fit", "Regression fit")
            sec.parts.append(_fit(page, folder, spec, metrics, storage))
        insight_section(page, folder, metrics, spec, storage=storage)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _fit(page, folder, spec, metrics: dict[str, Any], storage) -> str:
    if spec.data.source != "csv" or len(spec.data.features) != 1:
        return page.note("the fit plot needs a regression on one input feature")
    if not (folder / "predictions.npz").exists():
        return page.note("this retrain has no predictions.npz; run: hpo retrain --study " + spec.name)
    pred = np.load(folder / "predictions.npz")
    if "grid_x" not in pred:
        return page.note("this retrain's predictions.npz holds no grid_x / grid_best / grid_mean")

    def build() -> go.Figure:
        from hpo.data.sources import csv_arrays

        x_train, y_train = csv_arrays(spec.data, "train", storage=storage)
        x_test, y_test = csv_arrays(spec.data, "test", storage=storage)
        return regression_fit(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                              grid_x=pred["grid_x"], grid_best=pred["grid_best"], grid_mean=pred["grid_mean"],
                              best_fold=metrics.get("best_fold"))

    return page.figure(build, "regression fit")
