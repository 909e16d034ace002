-- The event store: the postgres-es `events` table (its seven insert columns
-- unchanged) with jsonb payloads, plus three columns filled by defaults that
-- the outbox relay needs to publish in commit order without ever skipping a
-- slow transaction (see ARCHITECTURE.md "Source of truth and ordering").
CREATE TABLE events
(
    aggregate_type  text                         NOT NULL,
    aggregate_id    text                         NOT NULL,
    sequence        bigint CHECK (sequence >= 0) NOT NULL,
    event_type      text                         NOT NULL,
    event_version   text                         NOT NULL,
    payload         jsonb                        NOT NULL,
    metadata        jsonb                        NOT NULL,
    global_position bigint GENERATED ALWAYS AS IDENTITY,
    tx_id           xid8        NOT NULL DEFAULT pg_current_xact_id(),
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);

CREATE UNIQUE INDEX events_global_position_key ON events (global_position);

-- The relay's read: rows of finished transactions (tx_id below the snapshot's
-- xmin) after its cursor, in (tx_id, global_position) order.
CREATE INDEX events_relay_order_idx ON events (tx_id, global_position);

-- One notification per INSERT statement, not per row: a batched append of a
-- thousand claims wakes the relay once.
CREATE FUNCTION notify_events_appended() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    PERFORM pg_notify('events_appended', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER events_appended
    AFTER INSERT ON events
    FOR EACH STATEMENT
EXECUTE FUNCTION notify_events_appended();

-- Where each relay instance got to. The cursor is a pair because the relay
-- reads in (tx_id, global_position) order: a transaction that took a lower
-- global_position but committed later still sorts after everything the relay
-- already published.
CREATE TABLE relay_cursor
(
    relay_name      text PRIMARY KEY,
    last_tx_id      xid8        NOT NULL DEFAULT '0'::xid8,
    last_position   bigint      NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
