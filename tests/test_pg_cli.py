"""The operator commands on the PostgreSQL journal: `db migrate|status`, `journal find` and
`saf list|retry|park` against the database the nodes share, the password from a file or the
environment and never printed."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import psycopg
import tomli_w

from conftest import config_dict
from iso_gateway.cli import main
from iso_gateway.journal.pg import PgStore
from iso_gateway.journal.store import SAF_PARKED, SafItem, new_id
from iso_gateway.security.pan import PanVault
from iso_gateway.sim.client import sample_auth
from pgserver import PgServer

pytest_plugins = ["conftest_pg"]


def write_config(tmp_path: Path, server: PgServer, dbname: str, **journal: object) -> Path:
    dsn = server.conninfo(dbname).replace(f"password={server.password} ", "")
    raw = config_dict(1, state_dir=tmp_path, journal={"backend": "postgresql", "dsn": dsn, "node": "gw-a", **journal})
    path = tmp_path / "gateway.toml"
    path.write_text(tomli_w.dumps(raw), encoding="utf-8")
    return path


def test_db_migrate_and_status_with_the_password_from_a_file(pg_server: PgServer, tmp_path: Path, capsys) -> None:
    pwfile = tmp_path / "db-password"
    pwfile.write_text(pg_server.password + "\n")
    pwfile.chmod(0o600)
    cfg = write_config(tmp_path, pg_server, pg_server.create_database(), password_file=str(pwfile))
    assert main(["db", "status", "--config", str(cfg)]) == 2  # pending
    assert main(["db", "migrate", "--config", str(cfg)]) == 0
    assert main(["db", "status", "--config", str(cfg)]) == 0
    out = capsys.readouterr()
    assert "pending: 0003_duplicate_keys" in out.out and "applied migrations 1, 2, 3" in out.out
    assert "schema version 3, this program's latest 3" in out.out and "password=********" in out.out
    assert pg_server.password not in out.out + out.err
    pwfile.chmod(0o644)  # readable by others: refused, with one line
    assert main(["db", "status", "--config", str(cfg)]) == 1
    assert "chmod 600" in capsys.readouterr().err


def test_journal_find_and_saf_commands_work_on_the_shared_store(pg_server: PgServer, tmp_path: Path, capsys,
                                                               monkeypatch) -> None:
    monkeypatch.setenv("TEST_DB_PASSWORD", pg_server.password)
    dbname = pg_server.create_database()
    cfg = write_config(tmp_path, pg_server, dbname, password_env="TEST_DB_PASSWORD")
    assert main(["db", "migrate", "--config", str(cfg)]) == 0
    vault = PanVault(secrets.token_bytes(32))
    req = {k: v for k, v in sample_auth(77, 12345).items() if k != "t"}
    item = SafItem(id=new_id(), txn_id=None, upstream="cmi", state=SAF_PARKED, reason="timeout", mti="0420", stan="",
                   f90="0100000077", attempts=6, next_attempt=time.time(), created=time.time(),
                   message={**req, "t": "0420"})
    with psycopg.connect(pg_server.conninfo(dbname)) as conn:
        store = PgStore(vault, "gw-b")  # another node's rows: the tools see every node's
        store.insert_txn(conn, {"id": new_id(), "listener": "ecom", "mti": "0100", "upstream": "cmi", "link": 0,
                                "upstream_stan": "000123"}, req)
        store.insert_saf(conn, item)
    capsys.readouterr()
    assert main(["journal", "find", "--config", str(cfg), "--rrn", req["37"], "--json"]) == 0
    (found,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert found["rrn"] == req["37"] and found["pan"] == "476173******0119" and found["upstream_stan"] == "000123"
    assert main(["saf", "list", "--config", str(cfg), "--json"]) == 0
    (listed,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert listed["id"] == item.id and listed["state"] == "parked"
    assert main(["saf", "retry", "--config", str(cfg), str(item.id)]) == 0
    assert main(["saf", "list", "--config", str(cfg), "--json", "--state", "pending"]) == 0
    out = capsys.readouterr().out
    assert '"state": "pending"' in out and '"attempts": 1' in out  # the next attempt is a repeat (0421)
    assert main(["saf", "park", "--config", str(cfg), "--all"]) == 0
    assert main(["saf", "park", "--config", str(cfg), "12345"]) == 1  # nothing changed: says so
    out = capsys.readouterr()
    assert pg_server.password not in out.out + out.err and req["2"] not in out.out
