-- Duplicates across nodes: each transaction row keeps the front end's duplicate key (listener, DE 41,
-- 42, 11, 7, 4, 37; no card data) and the duplicate window it was received in (created divided by the
-- window's length), so that a retry landing on another node finds the first request. The unique
-- index makes two nodes inserting the same key at once wait for each other: the second insert
-- does nothing (ON CONFLICT), and PgStore.insert_txn_many answers it with the first one's outcome.
-- (A retry in the next window is found by a look-up over the window's length, PgStore.insert_txn_many.)
ALTER TABLE txn ADD COLUMN dup_key TEXT NOT NULL DEFAULT '';
ALTER TABLE txn ADD COLUMN dup_bucket BIGINT NOT NULL DEFAULT 0;
CREATE UNIQUE INDEX txn_dup_key ON txn (dup_key, dup_bucket) WHERE dup_key <> '';
-- Room on each page for a row's new version: a transaction's answer (state, codes, time: no indexed
-- column) is then a heap-only update, which touches none of the table's indexes.
ALTER TABLE txn SET (fillfactor = 70);
