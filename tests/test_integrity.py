"""Crash safety: SIGKILL under load loses nothing, and what the switch saw reconciles with what front ends heard."""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

import trio

from conftest import TEST_PAN, wait_for, write_daemon_config
from iso_gateway.journal import txlog
from iso_gateway.journal import SQLiteStore
from iso_gateway.config import load_config
from iso_gateway.keys import open_security_module
from iso_gateway.core.message import OriginalData
from iso_gateway.sim.client import FrontEndClient, sample_auth
from iso_gateway.sim.integrity import GatewayProcess, free_port, run_check
from iso_gateway.sim.switch import SwitchSimulator


async def test_thousands_of_authorizations_survive_a_sigkill_and_a_misbehaving_switch():
    report = await run_check(requests=2000, kills=1, seed=8583, connections=12, in_flight=4)
    assert report["violations"] == 0, report["violation_samples"]
    assert report["answered"] + report["lost_with_a_killed_gateway"] == 2000
    assert report["switch_approved"] > 1000 and report["reversals_acknowledged"] > 0
    log = Path(report["state_dir"], "gateway.log").read_text()
    assert TEST_PAN not in log
    journal = b"".join(p.read_bytes() for p in Path(report["state_dir"]).glob("journal.sqlite3*"))  # logs too
    assert TEST_PAN.encode() not in journal


async def test_a_transaction_in_flight_when_the_gateway_is_killed_is_reversed_after_restart(nursery, tmp_path):
    sim = SwitchSimulator()
    switch_port = await nursery.start(sim.serve, "127.0.0.1", 0)
    port = free_port()
    cfg = write_daemon_config(tmp_path / "gateway.toml", switch_port, port=port, log_file=tmp_path / "gateway.log",
                              upstream={"saf_first_delay": 0.2, "saf_retry_initial": 0.2, "reversal_timeout": 1.0},
                              routes=[{"name": "all", "upstream": "cmi", "timeout": 30.0}])  # it stays in flight
    gateway = GatewayProcess(cfg, port)
    await gateway.start()
    try:
        client = await FrontEndClient.connect("127.0.0.1", port, "iso87ascii", "ascii4")
        req = sample_auth(4242, 10097)  # the switch never answers it
        req["37"] = "000000004242"
        async with trio.open_nursery() as n:
            async def ask():
                try:
                    await client.request(req, timeout=10)
                except Exception:  # noqa: BLE001 - the gateway dies under it
                    pass
            n.start_soon(ask)
            await wait_for(lambda: any(r.rrn == "000000004242" for r in sim.records), 5, "the switch got it")
            killed_pid = gateway.proc.pid
            gateway.proc.send_signal(signal.SIGKILL)
            await gateway.proc.wait()
        # Journaled before it was sent: in SQLite already, or in the write-ahead log (journal/txlog.py)
        # if the gateway died before its next bulk write.
        db_path = tmp_path / "journal.sqlite3"
        db = sqlite3.connect(db_path)
        in_db = db.execute("SELECT state FROM txn WHERE rrn='000000004242'").fetchall()
        db.close()
        store = SQLiteStore(open_security_module(load_config(cfg)).pan_vault())  # the daemon's data keys
        logged = [store.logged_params(r) for seg in txlog.segments(str(db_path))
                  for r in txlog.read(seg, store.vault.open_bytes)[0] if r[0] == "T"]
        logged = [row for row in logged if row[12] == "000000004242"]  # the rrn column
        assert in_db == [("forwarded",)] or (not in_db and len(logged) == 1 and logged[0][17] == "forwarded")
        await gateway.start()
        await wait_for(lambda: any(r.mti in ("0420", "0421") and r.rrn == "000000004242" for r in sim.records),
                       10, "the in-doubt reversal")
        # The dead process's segments were replayed into SQLite at start, then deleted.
        assert not [seg for seg in txlog.segments(str(db_path)) if seg.name.endswith(f"-{killed_pid}")]
        original = next(r for r in sim.records if r.mti == "0100" and r.rrn == "000000004242")
        reversal = next(r for r in sim.records if r.mti in ("0420", "0421") and r.rrn == "000000004242")
        assert OriginalData.parse(reversal.original).stan == original.stan
    finally:
        await gateway.stop()


def test_a_request_answered_96_that_the_switch_received_is_a_violation_of_the_outage_check() -> None:
    from types import SimpleNamespace

    from iso_gateway.sim.integrity import Outcome, refused_but_sent

    records = [SimpleNamespace(rrn="000000000001", mti="0100"), SimpleNamespace(rrn="000000000003", mti="0420")]
    outcome = Outcome(answered={"000000000001": "96", "000000000002": "96", "000000000003": "96",
                                "000000000004": "00"})
    assert refused_but_sent(records, outcome) == ["000000000001"]  # 2 never reached it; 3 only as a reversal
    assert refused_but_sent(records, Outcome(answered={"000000000001": "00"})) == []
