"""dbos-config.yaml (for the `dbos` CLI) says what the pods' in-code DBOS config says."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
from dbos._dbos_config import load_config
from threadgate.main import dbos_config
from threadgate.settings import load_settings

pytestmark = pytest.mark.unit

CONFIG = Path(__file__).resolve().parents[2] / "dbos-config.yaml"


def test_dbos_config_file_matches_the_pods(monkeypatch: pytest.MonkeyPatch) -> None:
    url = "postgresql://postgres@db.example:5432/threadgate"
    monkeypatch.setenv("THREADGATE_DATABASE_URL", url)
    from_file = load_config(str(CONFIG))
    in_code = dbos_config(load_settings(database_url=url, pod_name="threadgate-0"))
    assert from_file["name"] == in_code["name"]
    assert from_file["system_database_url"] == in_code["system_database_url"] == url
    assert in_code["executor_id"] == "threadgate-0"


def test_dbos_config_file_follows_the_schema() -> None:
    import yaml

    schema = json.loads(resources.files("dbos").joinpath("dbos-config.schema.json").read_text())
    data = yaml.safe_load(CONFIG.read_text())
    assert set(data) <= set(schema["properties"])
    assert set(data["runtimeConfig"]) <= set(schema["properties"]["runtimeConfig"]["properties"])


def test_a_multi_host_url_reaches_dbos_in_sqlalchemy_form() -> None:
    """libpq's multi-host URL (a primary and its standbys) is refused by SQLAlchemy's parser,
    which DBOS uses: DBOS gets SQLAlchemy's spelling, which its psycopg dialect turns back
    into the same libpq hosts, ports and options."""
    import sqlalchemy as sa
    from threadgate.store.db import dbos_url

    url = "postgresql://app:p%40ss@db-a:5432,db-b:5433/tg?target_session_attrs=read-write"
    with pytest.raises(ValueError):
        sa.make_url(url)
    settings = load_settings(database_url=url, pod_name="threadgate-0")
    converted = dbos_config(settings)["system_database_url"]
    assert converted == dbos_url(url)
    engine = sa.create_engine(sa.make_url(converted).set(drivername="postgresql+psycopg"))
    _, kwargs = engine.dialect.create_connect_args(engine.url)
    assert (kwargs["host"], kwargs["port"]) == ("db-a,db-b", "5432,5433")
    assert (kwargs["user"], kwargs["password"], kwargs["dbname"]) == ("app", "p@ss", "tg")
    assert kwargs["target_session_attrs"] == "read-write"
    single = "postgresql://postgres@db.example:5432/threadgate"
    assert dbos_url(single) == single
