-- The journal's tables on PostgreSQL: the same rows as the SQLite store (store.py), plus what several
-- nodes sharing one database need: the node that wrote each row, a heartbeat per node, leases on the
-- reversals owed, and a STAN counter per switch link. Applied once, in one transaction, by migrate.py.

CREATE TABLE txn (
    id BIGINT PRIMARY KEY,              -- store.new_id: grows with time
    created DOUBLE PRECISION NOT NULL,  -- epoch seconds
    updated DOUBLE PRECISION NOT NULL,
    listener TEXT, mti TEXT, terminal TEXT, merchant TEXT, front_stan TEXT, transmission TEXT,
    upstream TEXT, link INTEGER, upstream_stan TEXT, rrn TEXT, amount TEXT, currency TEXT,
    pan_masked TEXT,                    -- first 6 + last 4
    pan_hash TEXT,                      -- keyed hash (PanVault.pan_hash)
    state TEXT NOT NULL, response_code TEXT, auth_code TEXT,
    original BYTEA,                     -- the reversal fields, sealed (AES-GCM); erased by the purge
    worker INTEGER NOT NULL DEFAULT 0,
    acquirer TEXT,
    node TEXT NOT NULL DEFAULT ''       -- the node that sent it (and recovers it, unless another takes over)
);
CREATE INDEX txn_rrn ON txn (rrn);
CREATE INDEX txn_front_time ON txn (transmission, terminal, front_stan);
CREATE INDEX txn_node ON txn (node, id);

CREATE TABLE saf (
    id BIGINT PRIMARY KEY,
    txn_id BIGINT,
    upstream TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT, mti TEXT, stan TEXT, f90 TEXT, rrn TEXT, amount TEXT, currency TEXT, pan_masked TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt DOUBLE PRECISION NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    updated DOUBLE PRECISION NOT NULL,
    last_result TEXT,
    message BYTEA,                      -- the reversal's fields, sealed
    worker INTEGER NOT NULL DEFAULT 0,
    node TEXT NOT NULL DEFAULT '',      -- the node that queued it
    leased_by TEXT,                     -- the node sending it now, until lease_until (epoch seconds)
    lease_until DOUBLE PRECISION
);
CREATE INDEX saf_due ON saf (upstream, state, next_attempt);
CREATE INDEX saf_node_due ON saf (node, upstream, state, next_attempt);
CREATE INDEX saf_txn ON saf (txn_id);

CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);

-- One row per gateway node: alive while ``expires`` (epoch seconds) is ahead of the clock.
CREATE TABLE nodes (
    node TEXT PRIMARY KEY,
    started DOUBLE PRECISION NOT NULL,
    heartbeat DOUBLE PRECISION NOT NULL,
    expires DOUBLE PRECISION NOT NULL
);

-- The next STAN to hand out on each switch link (1..999999), taken in blocks under the row's lock.
CREATE TABLE stan_counter (
    link TEXT PRIMARY KEY,
    next INTEGER NOT NULL CHECK (next BETWEEN 1 AND 999999)
);
