"""docker-compose.yml and the Dockerfile, checked by parsing (Docker does not run here)."""

from __future__ import annotations

import re

import pytest
import yaml
from conftest import REPO

from hpo.cli import main

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def _defaults(value: str) -> str:
    """Compose's ``${VAR:-default}`` with nothing set in the environment."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def test_services_are_there():
    assert set(SERVICES) == {"postgres", "dashboard", "worker"}


def test_postgres_keeps_its_data_and_reports_health():
    pg = SERVICES["postgres"]
    assert pg["image"].startswith("postgres:")
    assert any(v.endswith(":/var/lib/postgresql/data") and v.split(":")[0] in COMPOSE["volumes"] for v in pg["volumes"])
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert all(p.startswith("127.0.0.1:") for p in pg.get("ports", []))


@pytest.mark.parametrize("name", ["dashboard", "worker"])
def test_store_url_points_at_the_postgres_service(name):
    env = SERVICES[name]["environment"]
    url = _defaults(env["HPO_STORAGE"])
    assert url.startswith("postgresql+psycopg2://hpo:") and "@postgres:5432/hpo" in url
    assert SERVICES[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert env["HPO_ARTIFACTS"] == "/artifacts" and "artifacts:/artifacts" in SERVICES[name]["volumes"]


def test_dashboard_is_bound_to_localhost():
    ports = SERVICES["dashboard"]["ports"]
    assert ports and all(p.startswith("127.0.0.1:") for p in ports)


def test_worker_reserves_a_gpu_and_can_be_scaled():
    worker = SERVICES["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    # --scale needs no fixed name or published port
    assert "container_name" not in worker and "ports" not in worker
    assert worker["stop_grace_period"] and int(worker["environment"]["HPO_GRACE_PERIOD"]) > 0


@pytest.mark.parametrize("name", ["dashboard", "worker"])
def test_service_commands_parse_as_hpo_commands(name):
    args = [_defaults(a) for a in SERVICES[name]["command"]]
    command = main.get_command(None, args[0])
    assert command is not None, args
    command.make_context(args[0], args[1:])  # raises on an unknown option


def pins(text: str) -> dict[str, str]:
    return dict(re.findall(r"\b(torch|torchvision)==([\w.+]+)", text))


def test_dockerfile_builds_the_worker_with_the_readmes_torch():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.\d+", text, re.M)
    assert 'ENTRYPOINT ["hpo"]' in text and "pip install ." in text
    # The image trains with the torch the README tells users to install and CI tests.
    readme, ci = pins((REPO / "README.md").read_text()), pins((REPO / ".ci" / "run").read_text())
    assert pins(text) == readme == ci and set(readme) == {"torch", "torchvision"}
    assert SERVICES["worker"]["build"] == "." and SERVICES["worker"]["image"] == SERVICES["dashboard"]["image"]
