-- What operators did with dead letters (the `citypicks-dlq` CLI, the only
-- writer): one row per re-drive or drop, never updated or deleted. An
-- entry's state is its latest row: none = open, `redriven`, `dropped`;
-- `failed_again` and `unconfirmed` leave it open. `entry` is a snapshot of
-- the dead letter as it was acted on (a re-driven edge entry leaves Redis).
CREATE TABLE dead_letter_actions
(
    id          bigserial   PRIMARY KEY,
    entry_id    text        NOT NULL CHECK (length(entry_id) BETWEEN 1 AND 300),
    source      text        NOT NULL CHECK (source IN ('events', 'projections', 'edge', 'timeouts')),
    action      text        NOT NULL CHECK (action IN ('redrive', 'drop')),
    outcome     text        NOT NULL CHECK (outcome IN ('redriven', 'failed_again', 'unconfirmed', 'dropped')),
    reason      text        CHECK (length(reason) <= 2000),
    detail      text        CHECK (length(detail) <= 4000),
    operator    text        NOT NULL CHECK (length(operator) BETWEEN 1 AND 200),
    entry       jsonb       NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX dead_letter_actions_entry ON dead_letter_actions (entry_id, id DESC);

COMMENT ON TABLE dead_letter_actions IS
    'Audit of dead-letter re-drives and drops by citypicks-dlq; the latest row per entry_id is its state.';
