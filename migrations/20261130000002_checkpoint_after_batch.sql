-- The projection daemon's workers commit a batch in several transactions
-- side by side, so the checkpoint row is now written right after a batch
-- commits (it serves the lag metrics), and the pause a replay needs while
-- it swaps tables is a transaction-level advisory lock on
-- 'projection:<name>' (shared by the daemon's workers, exclusive for the
-- replay) instead of this row's lock.
COMMENT ON TABLE projection_checkpoints IS
    'Last event each projection applied (stream sequence, global position), written after each batch commits; lag metrics read it.';
