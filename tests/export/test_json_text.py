"""Strict JSON: every JSON file hpo writes parses with a strict parser; non-finite numbers are null
and named in a note."""

from __future__ import annotations

import json

import numpy as np

from hpo.export.json_text import strict_dumps


def strict_loads(text: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_values_become_null_with_a_note():
    data = {"value": float("-inf"), "per_fold": [{"test_loss": float("nan")}, {"test_loss": 1.5}],
            "mean": np.float32("inf"), "ok": 2}
    out = strict_loads(strict_dumps(data))
    assert out["value"] is None and out["per_fold"][0]["test_loss"] is None and out["mean"] is None
    assert out["per_fold"][1]["test_loss"] == 1.5 and out["ok"] == 2
    assert out["non_finite"] == {"value": "-inf", "per_fold[0].test_loss": "nan", "mean": "inf"}
    assert strict_loads(strict_dumps([1.0, float("inf")])) == [1.0, None]
    assert "non_finite" not in strict_loads(strict_dumps({"a": 1.0}))
