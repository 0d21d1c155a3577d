"""Model families from installed entry points: hpo's own mlp and cnn through the same path as a
package's, specs of a plugin family checked against its declared domains, broken plugins refused
with their reason, and the CLI refusing a spec of an uninstalled family with nothing written."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import run_hpo
from plugin_package import env_with, example_installed, fake_install  # noqa: F401 (a fixture)

from hpo.errors import SpecError
from hpo.nn import registry
from hpo.nn.models import build_model
from hpo.spec.schema import parse_spec

SOURCE = "studies/own.yaml"


def spec(**overrides) -> dict:
    raw = {"name": "own", "model": "resnet_small", "data": {"source": "fashion_mnist"},
           "space": {"lr": {"float": [1e-3, 1e-2], "log": True}, "blocks": {"int": [1, 3]},
                     "width": {"choice": [8, 16], "per_layer": "blocks"}},
           "fixed": {"dropout": 0.1}}
    raw.update(overrides)
    return raw


def refused(raw: dict) -> str:
    with pytest.raises(SpecError) as err:
        parse_spec(raw, source=SOURCE)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_builtin_families_come_from_hpos_own_entry_points():
    for name in ("mlp", "cnn"):
        e = registry.entry(name)
        assert (e.distribution, e.value) == ("hpo", f"hpo.nn.builtin:{name}")
        assert e.obj.name == name
    assert registry.entry("mlp").obj.hyperparameters["width"].per_layer == "n_layers"
    assert registry.entry("cnn").obj.hyperparameters["dropout"].per_layer == "n_dense"
    assert "lr" in registry.vocabulary("mlp") and "lr" not in registry.family("mlp").hyperparameters


@pytest.mark.usefixtures("example_installed")
def test_a_plugin_family_is_found_validated_and_built():
    assert "resnet_small" in registry.names()
    e = registry.entry("resnet_small")
    assert e.provenance == {"name": "resnet_small", "distribution": "hpo-resnet-small", "version": "0.1.0"}
    parsed = parse_spec(spec(), source=SOURCE)
    assert parsed.model == "resnet_small"
    assert [p.name for p in parsed.space] == ["lr", "blocks", "width"]
    hp = registry.resolved("resnet_small", {"blocks": 2, "width": [8, 16], "dropout": 0.1})
    assert hp["epochs"] == 10 and "n_conv" not in hp  # training defaults, the family's own, no other family's
    model = build_model("resnet_small", hp, in_shape=(3, 8, 8), out_features=10)
    assert model(torch.zeros(5, 3, 8, 8)).shape == (5, 10)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


@pytest.mark.usefixtures("example_installed")
def test_a_plugin_familys_domains_refuse_with_one_line():
    assert refused(spec(space={"depth": {"int": [1, 3]}})) == (
        f"{SOURCE}: space.depth: unknown hyperparameter 'depth' of model 'resnet_small'; allowed: augment, batch_size, "
        "blocks, dropout, early_stopping, epochs, lr, lr_decay, momentum, optimizer, plateau_cooldown, "
        "plateau_factor, plateau_patience, scheduler, weight_decay, width")
    assert refused(spec(space={}, fixed={"n_conv": 2})).startswith(f"{SOURCE}: fixed.n_conv: unknown hyperparameter 'n_conv'")
    assert refused(spec(space={"blocks": {"int": [1, 9]}})) == (
        f"{SOURCE}: space.blocks.int: got [1, 9]; allowed: [low, high], each an integer in [1, 6]")
    assert refused(spec(space={}, fixed={"dropout": 1.0})) == (
        f"{SOURCE}: fixed.dropout: got 1.0; allowed: a number in [0, 1)")
    assert refused(spec(space={}, fixed={"blocks": 3, "width": [8, 8]})).startswith(f"{SOURCE}: fixed.width: got [8, 8]")
    assert refused(spec(space={}, fixed={"width": [8, 3000], "blocks": 2})) == (
        f"{SOURCE}: fixed.width[1]: got 3000; allowed: an integer in [4, 512]")


def test_uninstalled_and_broken_families_are_refused_with_the_reason(tmp_path, monkeypatch):
    assert refused(spec()) == (f"{SOURCE}: model: got 'resnet_small'; allowed: mlp, cnn (the installed model "
                               "families: a package's family needs that package installed; hpo families lists them)")
    # a module path is a name like any other: only installed entry points load, nothing is imported
    assert refused(spec(model="hpo.nn.builtin:mlp")).startswith(f"{SOURCE}: model: got 'hpo.nn.builtin:mlp'; allowed: mlp, cnn")
    site = fake_install(tmp_path / "site", dist="broken-fam", version="2.0", entry_points={"hpo.models": {
        "notafamily": "broken_fam:thing", "noimport": "broken_fam_missing:family", "misnamed": "broken_fam:misnamed"}},
        modules={"broken_fam.py": "from hpo.nn.family import Family, Param, integer\nthing = 42\n"
                 "misnamed = Family(name='other', hyperparameters={'k': Param(integer(1), 1)}, build=print)\n"})
    monkeypatch.syspath_prepend(str(site))
    registry.refresh()
    try:
        assert "int, not an hpo.nn.family.Family" in refused(spec(model="notafamily", space={}, fixed={}))
        assert "cannot import broken_fam_missing:family: ModuleNotFoundError" in refused(spec(model="noimport", space={}, fixed={}))
        message = refused(spec(model="misnamed", space={}, fixed={}))
        assert message == (f"{SOURCE}: model: model family 'misnamed' from broken-fam 2.0 cannot be used: the entry "
                           "point is named 'misnamed' but its family 'other'")
        assert parse_spec(spec(model="mlp", space={}, fixed={}), source=SOURCE).model == "mlp"  # the others still work
    finally:
        registry.refresh()
        sys.modules.pop("broken_fam", None)


@pytest.mark.parametrize("change, expected", [
    ({"model": "resnet_small"}, "model: got 'resnet_small'; allowed: mlp, cnn"),
    ({"fixed": {"blocks": 2}}, "fixed.blocks: unknown hyperparameter 'blocks'"),
])
def test_the_cli_refuses_a_spec_of_an_uninstalled_family_and_writes_nothing(tmp_path: Path, cli_env, change, expected):
    import yaml

    raw = {"name": "own", "model": "cnn", "data": {"source": "fashion_mnist"}, "fixed": {"filters": 4}, **change}
    path = tmp_path / "own.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = run_hpo("create-study", str(path), env=env_with(tmp_path / "nothing", cli_env), check=2)
    assert proc.stderr.count("\n") == 1 and expected in proc.stderr, proc.stderr
    assert not (tmp_path / "store").exists()


def test_hpo_families_lists_installed_families_and_sources(tmp_path, cli_env):
    from plugin_package import install_example

    proc = run_hpo("families", env=env_with(install_example(tmp_path / "site"), cli_env), check=0)
    for line in ("  mlp  (hpo ", "  resnet_small  (hpo-resnet-small 0.1.0, hpo_resnet_small.family:family)",
                 "    width: an integer in [4, 512], one per layer of blocks (default 16)",
                 "    blocks: an integer in [1, 6] (default 2)", "  image_folder  (hpo "):
        assert line in proc.stdout, proc.stdout
