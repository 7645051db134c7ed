-- Duplicates across nodes: each transaction row keeps the front end's duplicate key (listener, DE 41,
-- 42, 11, 7, 4, 37; no card data), so that a retry landing on another node finds the first request
-- (PgStore.insert_txn_many refuses a second row with the same key within the duplicate window).
ALTER TABLE txn ADD COLUMN dup_key TEXT NOT NULL DEFAULT '';
CREATE INDEX txn_dup_key ON txn (dup_key, created) WHERE dup_key <> '';
