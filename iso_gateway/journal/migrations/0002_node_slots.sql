-- Row ids (store.new_id) end in a 6-bit process number, so that processes writing the same tables
-- never make the same id. With several nodes on one database that number must differ between nodes
-- too: each live node (each process, with --workers) holds a slot, 0..63, claimed at start
-- (PgStore.claim_slot) and freed for reuse when its heartbeat runs out.
ALTER TABLE nodes ADD COLUMN slot INTEGER CHECK (slot BETWEEN 0 AND 63);
CREATE UNIQUE INDEX nodes_slot ON nodes (slot);
