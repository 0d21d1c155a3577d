"""The README's spec examples are real: each YAML block that is a spec parses and creates a study,
and one named after a shipped spec is that file, word for word."""

from __future__ import annotations

import re

import pytest
import yaml
from conftest import REPO, STUDIES

from hpo.data.tables import embed_csv
from hpo.search.study import create, open_study
from hpo.spec.schema import parse_spec
from hpo.store.storage import open_storage

BLOCK = re.compile(r"^```ya?ml\n(.*?)^```", re.S | re.M)


def spec_blocks() -> list[str]:
    blocks = BLOCK.findall((REPO / "README.md").read_text())
    return [b for b in blocks if isinstance(yaml.safe_load(b), dict) and {"name", "data"} <= set(yaml.safe_load(b))]


def test_readme_has_a_spec_example():
    assert spec_blocks()


@pytest.mark.parametrize("index", range(len(spec_blocks())))
def test_readme_spec_blocks_create_studies(index, store_url):
    text = spec_blocks()[index]
    raw = yaml.safe_load(text)
    shipped = STUDIES / f"{raw['name']}.yaml"
    if shipped.is_file():
        assert text == shipped.read_text(), f"README's {raw['name']} spec differs from {shipped}"
    spec = embed_csv(parse_spec(raw, source=f"README.md spec block {index}", base_dir=STUDIES))
    create(spec, open_storage(store_url, heartbeat=False), source=f"README.md spec block {index}")
    _, stored = open_study(raw["name"], open_storage(store_url, heartbeat=False))
    assert stored == spec
