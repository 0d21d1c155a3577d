"""Load an exported model (``hpo export-best``) as a ready ``torch.nn.Module``, and predict on files.

Every file's sha256 is checked against ``manifest.json`` before anything is read, and weights are
read with ``torch.load(weights_only=True)``: a tampered or truncated file is refused, never run.
(The manifest itself is not signed: it guards against damage and casual edits, not against someone
who rewrites the manifest too.)

The module takes RAW inputs, in the units of the data set (CSV feature values, image pixels as
stored), and applies the stored normalisation itself:
- regression: ``model(x)`` is the prediction, shape (N, 1): the mean over folds (or one fold's).
- classification: ``model(x)`` gives class scores (N, C): the mean of the folds' softmax
  probabilities for ``soft_vote`` (or one fold), the share of folds voting for each class for
  ``majority_vote``; ``model.predict(x)`` gives class indices (N,), majority-vote ties going to
  the best-on-validation fold's choice as in the retrain (so ``model(x).argmax(-1)``, which takes
  the lowest tied index, may differ from ``predict`` on ties); ``model.classes`` names them.
``model.predict(x)`` (and ``model.predict_proba(x)``, a classifier's soft-vote class probabilities)
returns the type it is given: a NumPy array for a NumPy array (or a list), a tensor (on the module's
device) for a tensor; both run under ``torch.inference_mode``. ``model(x)`` is the module's forward
and always returns a tensor.

Inputs on another scale. An export made since the training inputs' statistics were recorded
(``model.json`` ``input_stats``: min, max, mean, std per feature, or over all pixels of images)
checks what it is given. Per feature (or over all values), with the training values spanning
``[lo, hi]`` (``span = hi - lo > 0``), the inputs are on another scale when
- some input lies more than ``FAR_OUTSIDE`` spans outside ``[lo, hi]`` (raw 0..255 pixels given to a
  model trained on [0, 1] inputs), or
- at least ``MIN_VALUES`` input values span less than ``span / SQUEEZED`` (pixels scaled to [0, 1],
  as torchvision's ``ToTensor`` does, given to a model trained on raw 0..255 pixels).
``predict`` and ``predict_proba`` then warn (:class:`InputScaleWarning`), naming the range the model
expects; ``hpo predict`` refuses unless ``--force``. An older export (no ``input_stats``) is not checked.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import nn

from hpo.data.checksum import sha256_file
from hpo.errors import DataError, HpoError
from hpo.export.folder import EXPORT_FORMAT, MANIFEST, MODEL
from hpo.retrain import ensemble as ens
from hpo.spec.domains import show
from hpo.store.config import STORAGE_ROOT
from hpo.store.paths import component_problem, name_in


def _check_family(folder: Path, description: dict[str, Any]) -> None:
    """Refuse, in one line naming the package to install, an export whose family is not installed here."""
    from hpo.nn import registry

    name = description["family"]
    if name not in registry.names():
        dist, version = description.get("distribution", "hpo"), description.get("version", "")
        pin = f"=={version}" if version and version != "?" else ""
        raise HpoError(f"{folder}: the model is of family {name!r} from {dist} {version}, which is not installed "
                       f"here: pip install '{dist}{pin}'")


FAR_OUTSIDE = 10  # training spans beyond the training range: clearly another scale
SQUEEZED = 20  # inputs spanning under 1/SQUEEZED of the training span: clearly another scale ...
MIN_VALUES = 100  # ... when there are at least this many of them (one row of a CSV says nothing)


class InputScaleWarning(UserWarning):
    """Inputs clearly on another scale than the training inputs (see the module's docstring)."""


def _num(value: float) -> str:
    return f"{value:.4g}"


def scale_problem(stats: dict | None, x: torch.Tensor, *, features: tuple[str, ...] = ()) -> str | None:
    """Why the inputs ``x`` (N, ...) look clearly on another scale than the training inputs described by
    ``stats`` (``model.json``'s ``input_stats``), or None (also when there are no statistics)."""
    if not stats or not len(x):
        return None
    values = x.reshape(len(x), -1) if stats["over"] == "feature" else x.reshape(-1, 1)
    if values.shape[1] != len(stats["min"]):
        return None
    low, high = values.min(dim=0).values.tolist(), values.max(dim=0).values.tolist()
    for i, (lo, hi) in enumerate(zip(stats["min"], stats["max"], strict=True)):
        span = hi - lo
        if not span > 0:
            continue
        far = low[i] < lo - FAR_OUTSIDE * span or high[i] > hi + FAR_OUTSIDE * span
        squeezed = len(values) >= MIN_VALUES and high[i] - low[i] < span / SQUEEZED
        if far or squeezed:
            what = (f"feature {features[i]!r}" if i < len(features) else f"feature {i}") \
                if stats["over"] == "feature" else "the inputs"
            return (f"{what} span [{_num(low[i])}, {_num(high[i])}] but the model was trained on values in "
                    f"[{_num(lo)}, {_num(hi)}] (mean {_num(stats['mean'][i])}, std {_num(stats['std'][i])}): "
                    f"clearly another scale; give inputs in the training data's raw units")
    return None


class ExportedModel(nn.Module):
    """The fold models of a retrain behind the stored normalisation and the ensemble rule."""

    def __init__(self, models: list[nn.Module], *, description: dict[str, Any], rule: str, study: str = ""):
        super().__init__()
        self.models = nn.ModuleList(models)
        self.study = study  # the study the export came from
        self.task = description["task"]
        self.rule = rule
        # Majority-vote ties go to the class the best-on-validation fold scores highest, as in the retrain.
        self.tie_breaker = int(description.get("tie_breaker", 0)) if len(models) > 1 else 0
        self.in_shape = tuple(description["in_shape"])
        self.classes = tuple(description.get("classes") or ())
        self.features = tuple(description.get("features") or ())
        self.input_stats = description.get("input_stats")  # None in exports made before they were recorded
        norm = description.get("normalization") or {}
        self.register_buffer("scale", torch.tensor(float(norm.get("scale", 1.0))))
        self.register_buffer("mean", self._broadcastable(norm.get("mean", 0.0)))
        self.register_buffer("std", self._broadcastable(norm.get("std", 1.0)))

    def _broadcastable(self, values: Any) -> torch.Tensor:
        """Per-feature (size of one sample), per-channel (first axis) or one scalar statistic."""
        t = torch.as_tensor(values, dtype=torch.float32).flatten()
        if t.numel() == math.prod(self.in_shape):
            return t.reshape(self.in_shape)
        if t.numel() == self.in_shape[0]:
            return t.reshape(self.in_shape[0], *([1] * (len(self.in_shape) - 1)))
        if t.numel() == 1:
            return t.reshape(())
        raise HpoError(f"model.json: normalization has {t.numel()} values for inputs of shape {self.in_shape}")

    def inputs(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Raw inputs as a float32 tensor (N, *in_shape) on the module's device.

        Raises:
            DataError: inputs whose samples do not have the model's number of values.
        """
        if isinstance(x, np.ndarray) and not x.flags.writeable:
            x = np.array(x)  # torch warns on read-only arrays (pandas hands some out); a copy is safe
        x = torch.as_tensor(x, dtype=torch.float32, device=self.mean.device)
        if x.shape[1:] != self.in_shape:
            if x.dim() == 0 or math.prod(x.shape[1:]) != math.prod(self.in_shape):
                raise DataError(f"inputs of shape {tuple(x.shape)} do not fit the model's input shape "
                                f"(N, {', '.join(map(str, self.in_shape))})")
            x = x.reshape(len(x), *self.in_shape)
        return x

    def normalize(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        return (self.inputs(x) * self.scale - self.mean) / self.std

    def scale_problem(self, x: torch.Tensor | np.ndarray) -> str | None:
        """Why ``x`` looks clearly on another scale than the training inputs, or None (module docstring)."""
        return scale_problem(self.input_stats, self.inputs(x), features=self.features)

    def _checked(self, x: torch.Tensor | np.ndarray, check: bool) -> torch.Tensor:
        t = self.inputs(x)
        problem = scale_problem(self.input_stats, t, features=self.features) if check else None
        if problem:
            warnings.warn(problem, InputScaleWarning, stacklevel=3)
        return t

    def fold_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every fold model's raw output (logits for classes), shape (K, N, C)."""
        x = self.normalize(x)
        return torch.stack([m(x) for m in self.models])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = self.fold_outputs(x)
        if self.task == "regression":
            return ens.mean(outputs)
        if self.rule == "majority_vote":
            return ens.vote_shares(outputs)
        return ens.soft_vote(outputs)

    @torch.inference_mode()
    def predict(self, x: torch.Tensor | np.ndarray, *, check: bool = True) -> torch.Tensor | np.ndarray:
        """Predictions: values (N, 1) float32 for regression, class indices (N,) int64 for classification.

        Returns the type it is given: a NumPy array for a NumPy array (or a list), a tensor on the
        module's device for a tensor. Warns (:class:`InputScaleWarning`) when ``check`` and the inputs
        are clearly on another scale than the training inputs.
        """
        outputs = self.fold_outputs(self._checked(x, check))
        if self.task == "regression":
            out = ens.mean(outputs)
        elif self.rule == "majority_vote":
            out = ens.majority_vote(outputs, tie_breaker=self.tie_breaker)
        else:
            out = ens.soft_vote(outputs).argmax(-1)
        return out if isinstance(x, torch.Tensor) else out.cpu().numpy()

    @torch.inference_mode()
    def predict_proba(self, x: torch.Tensor | np.ndarray, *, check: bool = True) -> torch.Tensor | np.ndarray:
        """A classifier's class probabilities (N, C), float32, each row summing to 1: the mean of the
        folds' softmax probabilities (the soft vote, whatever the export's rule). Types and the scale
        check as in :meth:`predict`.

        Raises:
            HpoError: the model is a regression model.
        """
        if self.task != "classification":
            raise HpoError("--proba: a regression model predicts values, not class probabilities")
        out = ens.soft_vote(self.fold_outputs(self._checked(x, check)))
        return out if isinstance(x, torch.Tensor) else out.cpu().numpy()


def _read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``, or one line naming the file and what is wrong."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8 (UnicodeDecodeError is a ValueError)
        raise HpoError(f"{path}: unreadable {what} ({str(e).splitlines()[0][:120]}); export the model again") from e
    if not isinstance(data, dict):
        raise HpoError(f"{path}: unreadable {what} (expected a JSON object); export the model again")
    return data


def verify(folder: Path) -> dict:
    """Check every file of an export against its manifest. Returns the manifest.

    Raises:
        HpoError: no manifest, or a file missing, truncated or changed since the export.
    """
    path = folder / MANIFEST
    if not path.is_file():
        raise HpoError(f"{folder}: not an hpo export (no {MANIFEST}); make one with: hpo export-best --study NAME --out DIR")
    manifest = _read_json(path, "manifest")
    files = manifest.get("files")
    if not (isinstance(files, dict) and all(isinstance(e, dict) and isinstance(e.get("bytes"), int)
                                            and isinstance(e.get("sha256"), str) for e in files.values())):
        raise HpoError(f"{path}: unreadable manifest (files: expected {{name: {{sha256, bytes}}}}); export the model again")
    if manifest.get("format") != EXPORT_FORMAT:
        raise HpoError(f"{path}: format {show(manifest.get('format'))} is not {EXPORT_FORMAT!r}")
    for name, entry in files.items():
        if component_problem(name) is not None:
            raise HpoError(f"{path}: files: {show(name)} is not a file name of the folder; export the model again")
        file = folder / name
        if not file.is_file():
            raise HpoError(f"{folder}: {name} is missing; the export is incomplete, export it again")
        if file.stat().st_size != entry["bytes"] or sha256_file(file) != entry["sha256"]:
            raise HpoError(f"{file}: checksum mismatch (truncated or changed since the export); refusing to load it")
    return manifest


def load(path: str | Path, *, fold: int | None = None, device: str | torch.device = "cpu",
         ensemble: str | None = None) -> ExportedModel:
    """Load an export as a module in eval mode mapping raw inputs to predictions.

    Args:
        path: the folder written by ``hpo export-best``.
        fold: use only this fold's model (default: the ensemble of all folds).
        device: where to put the module.
        ensemble: override the exported ensemble rule (``soft_vote`` / ``majority_vote``).

    Raises:
        HpoError: bad checksums, an export without weights (saying to run ``hpo retrain``), or a
            fold or ensemble rule that the export does not have.
    """
    from hpo.nn.models import rebuild

    folder = Path(path)
    manifest = verify(folder)
    if not manifest.get("weights") or MODEL not in manifest["files"]:
        raise HpoError(f"{folder}: this export has parameters but no weights ({manifest.get('note') or 'no retrain'}); "
                       f"export again after the retrain")
    description = _read_json(folder / MODEL, MODEL)
    weights = description.get("weights")
    if not (isinstance(weights, list) and weights and all(isinstance(w, str) for w in weights)
            and isinstance(description.get("ensemble_rules"), list)):
        raise HpoError(f"{folder / MODEL}: malformed (weights and ensemble_rules: expected lists of names); "
                       f"export the model again")
    unlisted = [w for w in weights if w not in manifest["files"]]
    if unlisted:
        raise HpoError(f"{folder}: {', '.join(unlisted)} not in the manifest; refusing to load unverified weights")
    if fold is not None:
        if not 0 <= fold < len(weights):
            raise HpoError(f"--fold: got {fold}; this export has folds 0..{len(weights) - 1}")
        weights = [weights[fold]]
    rule = ensemble or description.get("ensemble")
    if rule not in description["ensemble_rules"]:
        raise HpoError(f"ensemble: got {show(rule)}; allowed: {', '.join(map(str, description['ensemble_rules']))}")
    if fold is not None and description.get("task") == "classification":
        rule = "soft_vote"  # one fold: its own probabilities
    _check_family(folder, description)
    models = []
    for name in weights:
        try:
            models.append(rebuild(description, folder / name))
        except HpoError:
            raise
        except Exception as e:  # unpickling refused, or weights that do not fit the described model
            raise HpoError(f"{folder / name}: cannot load the weights: {str(e).splitlines()[0]}") from e
    try:
        exported = ExportedModel(models, description=description, rule=rule,
                                 study=str(manifest.get("study") or folder.resolve().name))
    except HpoError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise HpoError(f"{folder / MODEL}: malformed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                       f"export the model again") from e
    return exported.to(device).eval()


def read_inputs(path: Path, model: ExportedModel) -> tuple[np.ndarray, Any]:
    """Inputs from a CSV (feature columns by name), .npy or IDX file, an image file or a folder of
    images (for image models: decoded as the training images were, converted to the model's
    channels); also the frame of input columns to write beside the predictions (the CSV's, the
    image files'), if any. Every value must be finite within float32 (one rule for every format)."""
    import pandas as pd

    from hpo.data.builtin_sources import IMAGE_EXTENSIONS, decode_images
    from hpo.data.csv_lines import FINITE, not_float32, read_numeric_csv
    from hpo.store.config import max_data_bytes

    images = None
    if path.is_dir():
        images = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not images:
            raise DataError(f"--input: {path}: a folder without image files ({', '.join(IMAGE_EXTENSIONS)})")
    elif path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
        images = [path]
    if images is not None:
        if len(model.in_shape) != 3 or model.in_shape[0] not in (1, 3):
            raise DataError(f"--input: {path}: images, but the model takes inputs of shape {model.in_shape}")
        x = decode_images(images, channels=model.in_shape[0])
        if x.shape[1:] != model.in_shape:
            raise DataError(f"--input: {images[0]}: {x.shape[3]}x{x.shape[2]} pixels; the model takes "
                            f"{model.in_shape[2]}x{model.in_shape[1]}")
        return x.astype(np.float32), pd.DataFrame({"file": [str(p) for p in images]})
    if not path.is_file():
        raise DataError(f"--input: {path} not found")
    size, limit = path.stat().st_size, max_data_bytes()
    if size > limit:
        raise DataError(f"--input: {path}: {size:,} bytes, over the limit of {limit:,} (HPO_MAX_DATA_BYTES); "
                        f"raise it, or predict on smaller files")
    name = path.name.lower()
    if name.endswith(".csv"):
        if not model.features:
            raise DataError(f"{path}: this model has no named features (it was not trained on a CSV); "
                            f"use a .npy or IDX file")
        frame, values = read_numeric_csv(str(path), model.features, role="feature ")
        return values.astype(np.float32), frame
    if name.endswith(".npy"):
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:  # truncated, not .npy, or an object array
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DataError(f"{path}: cannot read as .npy: {first}") from e
        if array.dtype.kind not in "biuf":
            raise DataError(f"{path}: holds {array.dtype} values; allowed: numbers")
    elif "idx" in name or name.endswith("-ubyte") or name.endswith(".gz"):
        from hpo.data.images import read_idx

        array = read_idx(path, max_bytes=limit)
    else:
        raise DataError(f"--input: {path}: unknown file type; use .csv, .npy, an IDX file (e.g. t10k-images-idx3-ubyte.gz), "
                        f"an image or a folder of images")
    bad = not_float32(array)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise DataError(f"{path}: element {list(where)}: got {array[where].item()!r}; allowed: {FINITE}")
    return array.astype(np.float32), None


def default_output(model: ExportedModel, input_path: Path, *, fold: int | None = None,
                   what: str = f"{MANIFEST}: study") -> Path:
    """Where ``hpo predict`` writes by default: ``storage/predictions/<study>/<input name>.csv``
    (``.fold<K>.csv`` for one fold's model), never beside the input.

    Raises:
        HpoError: a study name (read from the export's manifest: ``what``) that would leave
            ``storage/predictions`` (``hpo.store.paths``).
    """
    stem = (input_path.name.split(".")[0] or "input") + (f".fold{fold}" if fold is not None else "")
    folder = name_in(STORAGE_ROOT / "predictions", model.study, what=what)
    return name_in(folder, stem, what="--input", suffix=".csv")


def predict_file(model_dir: str | Path, input_path: str | Path, output_path: str | Path | None = None, *,
                 fold: int | None = None, device: str = "cpu", force: bool = False, proba: bool = False,
                 stdout: TextIO | None = None) -> Path | None:
    """Run an exported model on a file and write the predictions.

    The output is a CSV (the input's columns, when it is a CSV, then ``prediction`` and, for
    classifiers, ``class``, and with ``proba`` one ``proba_<class>`` column per class) or, for a
    ``.npy`` output path, the prediction array (with ``proba``: the (N, C) probabilities).

    Args:
        output_path: the file to write (default: see ``default_output``); ``"-"``: the CSV goes
            to ``stdout`` (default ``sys.stdout``).
        force: replace an existing output file, and predict on inputs clearly on another scale than
            the training inputs (both otherwise refused; the latter then warns, :class:`InputScaleWarning`).
        proba: also write a classifier's class probabilities (soft vote; each row sums to 1).

    Returns:
        The output path, or None when written to standard output.

    Raises:
        HpoError: a bad export (see ``load``), unreadable inputs or inputs of the wrong shape, inputs
            clearly on another scale without ``force``, ``proba`` for a regression model, an existing
            output without ``force``, or an output the file system refuses.
    """
    import pandas as pd

    input_path = Path(input_path)
    model = load(model_dir, fold=fold, device=device)
    if proba and model.task != "classification":
        raise HpoError("--proba: a regression model predicts values, not class probabilities")
    to_stdout = str(output_path) == "-"
    if not to_stdout:
        output_path = Path(output_path) if output_path else default_output(
            model, input_path, fold=fold, what=f"{Path(model_dir) / MANIFEST}: study")
        try:
            taken = output_path.exists()
        except OSError as e:  # e.g. a name too long for the file system
            raise HpoError(f"--output: cannot write {output_path}: {e.strerror or e}") from e
        if taken and not force:
            raise HpoError(f"--output: {output_path} already exists; pass --force to replace it "
                           f"(or --output FILE, or --output - for standard output)")
    x, frame = read_inputs(input_path, model)
    problem = model.scale_problem(x)
    if problem and not force:
        raise DataError(f"--input: {input_path}: {problem}; or pass --force to predict anyway")
    if problem:
        warnings.warn(f"{input_path}: {problem}", InputScaleWarning, stacklevel=2)
    chunks = range(0, len(x), 8192)
    pred = np.concatenate([model.predict(x[i:i + 8192], check=False) for i in chunks]) if len(x) else np.zeros(0)
    if model.task == "regression" and pred.ndim == 2:
        pred = pred[:, 0]
    out = frame.copy() if frame is not None else pd.DataFrame(index=range(len(pred)))
    out["prediction"] = pred
    if model.task == "classification" and model.classes:
        out["class"] = [model.classes[i] for i in pred]
    probabilities = None
    if proba:
        probabilities = np.concatenate([model.predict_proba(x[i:i + 8192], check=False) for i in chunks]) \
            if len(x) else np.zeros((0, len(model.classes)), dtype=np.float32)
        names = model.classes or tuple(map(str, range(probabilities.shape[1])))
        for j, name in enumerate(names):
            out[f"proba_{name}"] = probabilities[:, j]
    if to_stdout:
        out.to_csv(stdout or sys.stdout, index=False)
        return None
    try:
        output_path.parent.mkdir(parents=True, exist_ok=True)
        if output_path.suffix == ".npy":
            np.save(output_path, pred if probabilities is None else probabilities)
        else:
            out.to_csv(output_path, index=False)
    except OSError as e:
        raise HpoError(f"--output: cannot write {output_path}: {e.strerror or e}") from e
    return output_path
