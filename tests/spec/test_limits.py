"""No spec hangs or exhausts a machine: YAML aliases and depth bounded before anything is built,
a size limit on the file and the description, upper bounds on sizes, counts and epochs (HPO_LIMITS
raises them), and errors that never render an expanded value."""

from __future__ import annotations

import time

import pytest
import yaml
from conftest import run_hpo, small_regression_spec

from hpo.errors import SpecError
from hpo.spec.domains import LIMITS, show
from hpo.spec.schema import load_spec_file

LAUGHS = "name: lol\na: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True))


def test_billion_laughs_fails_fast_in_one_line_without_the_value(tmp_path):
    path = tmp_path / "lol.yaml"
    path.write_text(LAUGHS + "description: *i\n")
    assert len(LAUGHS) < 1024
    start = time.perf_counter()
    with pytest.raises(SpecError, match=r"lol.yaml: line \d+, column \d+: the document expands to more than 100,000") as e:
        load_spec_file(path)
    assert time.perf_counter() - start < 5
    assert "lol" not in str(e.value).replace("lol.yaml", "")
    proc = run_hpo("create-study", str(path), "--storage", f"sqlite:///{tmp_path / 's.db'}", check=2, timeout=60)
    assert proc.stderr.count("\n") == 1 and "expands to more than" in proc.stderr
    assert not (tmp_path / "s.db").exists()


def test_a_few_aliases_still_work(tmp_path):
    raw = yaml.safe_load(small_regression_spec(tmp_path).read_text())
    text = yaml.safe_dump(raw, sort_keys=False).replace("pruner:", "pruner: &p").replace("\nretrain:", "\nx: *p\nretrain:")
    path = tmp_path / "alias.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=r"x: unknown key"):  # the alias was expanded; the key is what is refused
        load_spec_file(path)


@pytest.mark.parametrize("text, message", [
    ("a: " + "[" * 200 + "]" * 200 + "\n", r"line 1, column \d+: nested more than 64 levels deep"),
    ("a: &x [1, *x]\n", r"alias \*x refers to a value that holds it"),
    ("a: " + "9" * 5000 + "\n", r"malformed YAML: .*digits"),
    ("a: [1, 2\n", r"line \d+, column \d+: malformed YAML"),
])
def test_hostile_yaml_is_one_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=message) as e:
        load_spec_file(path)
    assert "\n" not in str(e.value) and len(str(e.value)) < 400


def test_spec_files_that_are_not_text_or_too_large(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"name: x\n\xff\xfe\x00")
    with pytest.raises(SpecError, match=r"binary.yaml: line 2: not UTF-8 text \(byte 0xff\)"):
        load_spec_file(binary)
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (1 << 20) + "\nname: x\n")
    with pytest.raises(SpecError, match=r"big.yaml: larger than 1,048,576 bytes"):
        load_spec_file(big)


def test_description_has_a_size_limit(tmp_path):
    raw = yaml.safe_load(small_regression_spec(tmp_path).read_text())
    raw["description"] = "x" * 10_001
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(SpecError, match=r"description: got 'xxxxxxxxxxxxxxxxxxxx'... \(10001 bytes\); "
                                        r"allowed: a string of at most 10,000 bytes"):
        load_spec_file(path)


@pytest.mark.parametrize("where, value", [
    ("fixed", {"n_layers": 100_000}), ("fixed", {"width": 10**6}), ("space", {"epochs": {"int": [1, 10**6]}}),
    ("retrain", {"folds": 1000}), ("fixed", {"batch_size": 1 << 30}),
])
def test_upper_bounds_and_hpo_limits(tmp_path, monkeypatch, where, value):
    raw = yaml.safe_load(small_regression_spec(tmp_path).read_text())
    key = next(iter(value))
    raw[where] = {**{k: v for k, v in (raw.get(where) or {}).items() if k != key}, **value}
    if where == "fixed":
        raw["space"].pop(key, None)
    if key == "n_layers":
        raw["space"].pop("width")
        raw["fixed"]["width"] = 8
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    name = f"retrain.{key}" if where == "retrain" else key
    with pytest.raises(SpecError, match=rf"allowed: .*{LIMITS[name]}.*HPO_LIMITS={name}=N sets the upper bound"):
        load_spec_file(path)
    monkeypatch.setenv("HPO_LIMITS", f"{name}={10**10}")
    load_spec_file(path)
    monkeypatch.setenv("HPO_LIMITS", "nope=3")
    with pytest.raises(SpecError, match=r"HPO_LIMITS: 'nope' has no limit; names: epochs, "):
        load_spec_file(path)


def test_show_never_renders_a_large_value_whole():
    text = show({"a": [list(range(1000))] * 1000})
    assert len(text) < 210 and text.endswith(" ...")
    assert show(10**5000) == "an integer of about 5000 digits"
