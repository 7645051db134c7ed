"""The journal's common batch on PostgreSQL, new requests and the answers to earlier ones, goes in as
one statement (``PgStore.write_txns``, ``Journal._apply_at_once``): it must write and answer exactly
what the same batch run op by op in a transaction does (``Journal._apply``), duplicates within the
batch, across nodes and across a concurrent insert included, and fall back to that path when it
can't (a row updated in the batch that inserts it, a constraint failure)."""

from __future__ import annotations

import secrets
import threading
import time
from typing import Any, Iterator

import psycopg
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TEST_PAN
from iso_gateway.core.errors import DuplicateRecorded
from iso_gateway.journal import commit as journal_module
from iso_gateway.journal.commit import Journal, PgSettings, _Op
from iso_gateway.journal.pg import PgStore
from iso_gateway.journal.store import ANSWERED, FORWARDED, REVERSED, TIMED_OUT, id_at
from iso_gateway.security.pan import PanVault
from pgserver import PgServer

pytest_plugins = ["conftest_pg"]

WINDOW = 300.0
ORIGINAL = {"2": TEST_PAN, "4": "000000010000", "7": "1127101010", "11": "000123", "37": "633100000001",
            "41": "TERM0001", "42": "MERCHANT0000001", "49": "504"}
_seq = iter(range(1, 10**9))


def new_id() -> int:
    return id_at(time.time()) + next(_seq) * 64


def txn_row(txn_id: int, key: str = "") -> dict[str, Any]:
    return {"id": txn_id, "listener": "ecom", "mti": "0100", "upstream": "cmi", "link": 0,
            "upstream_stan": "400001", "dup_key": key}


def outcome(op: _Op) -> Any:
    """What an op's callback would be told, comparable across runs."""
    error = op.error
    if error is None:
        return None
    if isinstance(error, DuplicateRecorded):
        return ("duplicate", error.rc, error.auth_code)
    return type(error).__name__


class Node:
    """A journal (the commit thread's side, driven directly) on a database of its own."""

    def __init__(self, server: PgServer, vault: PanVault, node: str = "node-a") -> None:
        self.conninfo = server.conninfo(server.create_database())
        self.journal = Journal("", vault, pg=PgSettings(self.conninfo, node, db_timeout=5.0, start_timeout=10.0,
                                                        dup_window=WINDOW))
        self.store: PgStore = self.journal.store
        self.admin = psycopg.connect(self.conninfo, autocommit=True)
        self.at_once: list[Any] = []  # per write_txns call: done in one statement (True), not tried, failed
        real = self.store.write_txns

        def counted(conn: Any, calls: Any) -> Any:
            try:
                result = real(conn, calls)
            except Exception as exc:
                self.at_once.append(type(exc).__name__)
                raise
            self.at_once.append(result is not None)
            return result

        self.store.write_txns = counted  # type: ignore[method-assign]

    def insert(self, txn_id: int, key: str = "") -> _Op:
        return _Op(self.store.insert_txn, (txn_row(txn_id, key), {**ORIGINAL, "37": f"{txn_id % 10**12:012d}"}), {},
                   None)

    def update(self, txn_id: int, state: str, *codes: str | None) -> _Op:
        return _Op(self.store.update_txn, (txn_id, state, *codes), {}, None)

    def commit(self, ops: list[_Op]) -> list[Any]:
        self.journal._commit(ops)
        return [outcome(op) for op in ops]

    def rows(self) -> list[tuple[Any, ...]]:
        return self.admin.execute("SELECT id, state, response_code, auth_code, node, dup_key, pan_masked, rrn"
                                  " FROM txn ORDER BY id").fetchall()

    def existing(self, txn_id: int, key: str, *, node: str = "node-b", rc: str | None = None,
                 auth: str | None = None, age: float = 10.0) -> None:
        """A row already there: another node's by default, created ``age`` seconds ago."""
        other = PgStore(self.store.vault, node, dup_window=WINDOW)
        with psycopg.connect(self.conninfo) as conn:
            other.insert_txn(conn, txn_row(txn_id, key), ORIGINAL)
            if rc is not None:
                other.update_txn(conn, txn_id, ANSWERED, rc, auth)
            conn.execute("UPDATE txn SET created=created-%s, dup_bucket=dup_bucket-%s WHERE id=%s",
                         (age, int(age // WINDOW), txn_id))

    def reset(self) -> None:
        self.admin.execute("DELETE FROM txn")
        self.at_once.clear()

    def close(self) -> None:
        self.admin.close()
        self.journal.close()


@pytest.fixture
def vault() -> PanVault:
    return PanVault(secrets.token_bytes(32))


@pytest.fixture
def node(pg_server: PgServer, vault: PanVault) -> Iterator[Node]:
    n = Node(pg_server, vault)
    try:
        yield n
    finally:
        n.close()


def test_new_requests_and_answers_to_earlier_ones_go_in_one_statement_with_duplicates_answered(node: Node) -> None:
    answered, in_flight, earlier, old = new_id(), new_id(), new_id(), new_id()
    node.existing(answered, "k-answered", rc="05", auth=None)
    node.existing(in_flight, "k-in-flight")
    node.existing(old, "k-old", rc="00", age=2 * WINDOW)  # outside the window: no longer a duplicate
    node.existing(earlier, "", node="node-a")
    a, b, c, d, e, f = (new_id() for _ in range(6))
    ops = [node.insert(a, "k-new"), node.update(earlier, ANSWERED, "00", "AB12CD"), node.insert(b, "k-answered"),
           node.insert(c, "k-new"),  # the same key as a, earlier in this batch: in flight
           node.update(in_flight, ANSWERED, "51"),
           node.insert(d, "k-in-flight"),  # after the answer to the first one, in this batch: its answer
           node.insert(e, "k-old"), node.insert(f, "")]
    connection = node.journal._pg_connection()
    assert node.commit(ops) == [None, None, ("duplicate", "05", None), ("duplicate", None, None), None,
                                ("duplicate", "51", None), None, None]
    assert node.at_once == [True]
    assert connection.info.transaction_status == psycopg.pq.TransactionStatus.IDLE  # committed, nothing open
    got = {r[0]: r[1:6] for r in node.rows()}
    assert set(got) == {answered, in_flight, old, earlier, a, e, f}  # b, c, d never inserted: never sent
    assert got[earlier] == (ANSWERED, "00", "AB12CD", "node-a", "")
    assert got[in_flight] == (ANSWERED, "51", None, "node-b", "k-in-flight")
    assert got[a] == (FORWARDED, None, None, "node-a", "k-new")
    assert got[e][4] == "k-old" and got[f][4] == ""


def test_an_answer_before_the_duplicate_in_the_batch_is_its_answer_one_after_it_is_not(node: Node) -> None:
    first = new_id()
    node.existing(first, "k")
    x, y = new_id(), new_id()
    assert node.commit([node.insert(x, "k"), node.update(first, ANSWERED, "00", "XY12"), node.insert(y, "k")]) == [
        ("duplicate", None, None), None, ("duplicate", "00", "XY12")]


def test_a_batch_that_answers_a_row_it_inserts_is_written_in_a_transaction_with_the_same_result(node: Node) -> None:
    earlier = new_id()
    node.existing(earlier, "", node="node-a")
    a, b = new_id(), new_id()
    # (an answer to b before its insert finds no row, as in a transaction: b stays forwarded)
    ops = [node.update(b, TIMED_OUT), node.insert(a, "ka"), node.update(earlier, ANSWERED, "00"),
           node.insert(b, "kb"), node.update(a, ANSWERED, "00", "A1"), node.update(a, REVERSED)]
    assert node.commit(ops) == [None] * 6
    assert node.at_once == [False]
    got = {r[0]: r[1:4] for r in node.rows()}
    assert got == {earlier: (ANSWERED, "00", None), a: (REVERSED, "00", "A1"), b: (FORWARDED, None, None)}


def test_a_constraint_failure_writes_nothing_of_the_statement_then_each_op_alone(node: Node) -> None:
    there, answered = new_id(), new_id()
    node.existing(there, "", node="node-a")
    node.existing(answered, "", node="node-a")
    fresh = new_id()
    ops = [node.insert(fresh, "kf"), node.insert(there, "kt"), node.update(answered, ANSWERED, "00")]
    assert node.commit(ops) == [None, "UniqueViolation", None]
    assert node.at_once == ["UniqueViolation"]  # tried at once first: it failed as a whole
    got = {r[0]: r[1:3] for r in node.rows()}
    assert got == {there: (FORWARDED, None), answered: (ANSWERED, "00"), fresh: (FORWARDED, None)}
    assert node.journal.failed is None  # an op's own error, not the store's


def test_a_key_another_node_inserts_at_the_same_moment_is_refused_with_its_answer(node: Node) -> None:
    other = psycopg.connect(node.conninfo)
    them = PgStore(node.store.vault, "node-b", dup_window=WINDOW)
    theirs, ours, alone = new_id(), new_id(), new_id()
    them.insert_txn(other, txn_row(theirs, "k-race"), ORIGINAL)  # not committed yet: ours waits on the index
    them.update_txn(other, theirs, ANSWERED, "00", "R4C3")
    ops = [node.insert(ours, "k-race"), node.insert(alone, "k-alone")]
    done: list[Any] = []
    thread = threading.Thread(target=lambda: done.append(node.commit(ops)))
    thread.start()
    time.sleep(0.3)
    assert not done  # waiting for the other node's commit
    other.commit()
    other.close()
    thread.join(10)
    assert done == [[("duplicate", "00", "R4C3"), None]]
    assert {r[0]: r[4] for r in node.rows()} == {theirs: "node-b", alone: "node-a"}


def test_with_the_database_gone_the_requests_of_a_batch_fail_and_its_answers_are_kept(
        node: Node, pg_server: PgServer, monkeypatch: pytest.MonkeyPatch) -> None:
    earlier = new_id()
    node.existing(earlier, "", node="node-a")

    def refused(conn: Any, calls: Any) -> Any:
        raise psycopg.OperationalError("the server closed the connection")

    monkeypatch.setattr(node.store, "write_txns", refused)
    ops = [node.insert(new_id(), "k"), node.update(earlier, ANSWERED, "00")]
    node.journal._commit(ops)
    assert ops[0].error is not None and not ops[0].kept  # answered 96, never sent
    assert ops[1].kept and node.journal.holding_writes  # kept, and retried
    monkeypatch.undo()
    node.journal._kept_at = 0.0
    node.journal._commit([])
    assert not node.journal.holding_writes and node.journal.failed is None
    assert {r[0]: r[1:3] for r in node.rows()} == {earlier: (ANSWERED, "00")}


# A batch: ("i", new row n, key) or ("u", row, state, rc, auth); rows 0-3 exist before it (0 and 1 are
# another node's with keys "k0" and "k1", 1 answered), new rows are 4 onwards.
_ops = st.lists(st.one_of(
    st.tuples(st.just("i"), st.integers(4, 9), st.sampled_from(["", "k0", "k1", "k2", "k3"])),
    st.tuples(st.just("u"), st.integers(0, 9), st.sampled_from([ANSWERED, TIMED_OUT, REVERSED]),
              st.sampled_from([None, "00", "05"]), st.sampled_from([None, "AU1"]))), min_size=1, max_size=12)


@pytest.fixture
def pair(pg_server: PgServer, vault: PanVault) -> Iterator[tuple[Node, Node]]:
    a, b = Node(pg_server, vault), Node(pg_server, vault)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=_ops)
def test_one_statement_writes_and_answers_what_the_ops_in_a_transaction_do(
        pair: tuple[Node, Node], batch: list[tuple[Any, ...]], monkeypatch: pytest.MonkeyPatch) -> None:
    at_once, in_order = pair
    ids = [new_id() for _ in range(10)]
    results = []
    for n in pair:
        n.reset()
        n.existing(ids[0], "k0")
        n.existing(ids[1], "k1", rc="05", auth="AU9")
        n.existing(ids[2], "", node="node-a")
        n.existing(ids[3], "k3", node="node-a", age=2 * WINDOW)
        ops = [n.insert(ids[o[1]], o[2]) if o[0] == "i" else n.update(ids[o[1]], o[2], o[3], o[4]) for o in batch]
        with monkeypatch.context() as m:
            if n is in_order:
                m.setattr(journal_module.Journal, "_apply_at_once", lambda self, conn, ops: False)
            results.append((n.commit(ops), n.rows()))
    assert results[0] == results[1]
    # In one statement unless it answers a row it inserted earlier (or failed as a whole: then op by op).
    answers_its_own = any(o[0] == "u" and any(p[0] == "i" and p[1] == o[1] for p in batch[:j])
                          for j, o in enumerate(batch))
    assert at_once.at_once in ([False] if answers_its_own else [True], ["UniqueViolation"])


# --------------------------------------------------------------------------- from the event loop


async def running(node: Node, nursery: Any) -> Journal:
    """The node's journal running in ``nursery``, its event loop's connection open."""
    journal = node.journal
    await nursery.start(journal.run)
    deadline = time.monotonic() + 10
    while journal._here is None:
        assert time.monotonic() < deadline, "the event loop's connection never opened"
        await trio.sleep(0.01)
    return journal


async def submit_all(journal: Journal, ops: list[_Op]) -> list[Any]:
    """Submit ``ops`` in one turn of the loop; their outcomes once every callback ran."""
    done = trio.Event()
    outcomes: dict[int, Any] = {}
    for n, op in enumerate(ops):
        def callback(result: Any, error: BaseException | None, n: int = n, op: _Op = op) -> None:
            op.error = error
            outcomes[n] = outcome(op)
            if len(outcomes) == len(ops):
                done.set()

        journal.submit(op.fn, *op.args, callback=callback)
    with trio.fail_after(10):
        await done.wait()
    return [outcomes[n] for n in range(len(ops))]


async def test_the_common_batch_goes_from_the_event_loop_and_the_thread_is_not_woken(node: Node, nursery: Any) -> None:
    journal = await running(node, nursery)
    earlier = new_id()
    node.existing(earlier, "", node="node-a")
    node.existing(new_id(), "k-there", rc="00", auth="TH3R3")
    a, b = new_id(), new_id()
    outcomes = await submit_all(journal, [node.insert(a, "k-a"), node.update(earlier, ANSWERED, "00", "E1"),
                                          node.insert(b, "k-there")])
    assert outcomes == [None, None, ("duplicate", "00", "TH3R3")]
    assert node.at_once == []  # the thread wrote none of it (it would have tried write_txns)
    got = {r[0]: r[1:4] for r in node.rows()}
    assert got[a] == (FORWARDED, None, None) and got[earlier] == (ANSWERED, "00", "E1") and b not in got


async def test_other_operations_keep_the_order_through_the_thread(node: Node, nursery: Any) -> None:
    journal = await running(node, nursery)
    earlier = new_id()
    node.existing(earlier, "", node="node-a")
    ops = [node.update(earlier, ANSWERED, "00"), _Op(node.store.set_meta, ("k", "v"), {}, None),
           node.update(earlier, REVERSED)]
    assert await submit_all(journal, ops) == [None, None, None]
    assert node.at_once == [] and node.admin.execute("SELECT value FROM meta WHERE key='k'").fetchall() == [("v",)]
    assert {r[0]: r[1:3] for r in node.rows()} == {earlier: (REVERSED, "00")}


async def test_a_batch_whose_connection_fails_is_run_by_the_thread_and_the_connection_comes_back(
        node: Node, nursery: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal_module, "STORE_RETRY_MAX", 0.05)  # how soon it is opened again
    journal = await running(node, nursery)
    earlier = new_id()
    node.existing(earlier, "", node="node-a")
    node.admin.execute("SELECT pg_terminate_backend(%s)", (journal._here.info.backend_pid,))
    a = new_id()
    assert await submit_all(journal, [node.insert(a, "k-a"), node.update(earlier, ANSWERED, "05")]) == [None, None]
    assert node.at_once == [True]  # the thread ran them (in one statement)
    assert {r[0]: r[1:3] for r in node.rows()} == {earlier: (ANSWERED, "05"), a: (FORWARDED, None)}
    assert journal.failed is None
    deadline = time.monotonic() + 10
    while journal._here is None:
        assert time.monotonic() < deadline, "the event loop's connection never came back"
        await trio.sleep(0.01)
    assert await submit_all(journal, [node.insert(new_id(), "k-b")]) == [None]
    assert node.at_once == [True]  # the event loop's again


async def test_from_the_event_loop_a_key_another_node_inserts_at_the_same_moment_gets_its_answer(
        node: Node, nursery: Any) -> None:
    journal = await running(node, nursery)
    other = psycopg.connect(node.conninfo)
    them = PgStore(node.store.vault, "node-b", dup_window=WINDOW)
    theirs, ours, alone = new_id(), new_id(), new_id()
    them.insert_txn(other, txn_row(theirs, "k-race"), ORIGINAL)  # not committed yet: ours waits on the index
    them.update_txn(other, theirs, ANSWERED, "05", None)

    async def commit_later() -> None:
        await trio.sleep(0.3)
        await trio.to_thread.run_sync(other.commit)

    nursery.start_soon(commit_later)
    outcomes = await submit_all(journal, [node.insert(ours, "k-race"), node.insert(alone, "k-alone")])
    other.close()
    assert outcomes == [("duplicate", "05", None), None]
    assert node.at_once == []  # the event loop's: the look-up after the statement too
    assert {r[0]: r[4] for r in node.rows()} == {theirs: "node-b", alone: "node-a"}
