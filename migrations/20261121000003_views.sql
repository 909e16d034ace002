-- The read side: one JSON document per aggregate in a view table, the
-- projection daemon's checkpoints, and the events it had to skip.
--
-- Every view table has the same shape so one writer serves them all: the
-- document, the aggregate sequence it reflects (`version`), and the columns
-- the query API filters, sorts and authorizes on (NULL where a view has no
-- such field). The replay CLI builds `<table>_shadow` copies (LIKE ... INCLUDING
-- ALL) and swaps them in by renaming.

CREATE TABLE order_view
(
    id         text PRIMARY KEY,
    version    bigint      NOT NULL,
    doc        jsonb       NOT NULL,
    user_id    text,
    status     text,
    created_at timestamptz,
    updated_at timestamptz
);
-- "my orders" and "orders in a status", newest first, keyset-paginated by (created_at, id)
CREATE INDEX order_view_user_created_idx ON order_view (user_id, created_at DESC, id DESC);
CREATE INDEX order_view_status_created_idx ON order_view (status, created_at DESC, id DESC);
CREATE INDEX order_view_created_idx ON order_view (created_at DESC, id DESC);
-- containment filters on any document field
CREATE INDEX order_view_doc_idx ON order_view USING gin (doc jsonb_path_ops);

CREATE TABLE coupon_view
(
    id         text PRIMARY KEY,
    version    bigint      NOT NULL,
    doc        jsonb       NOT NULL,
    user_id    text,
    status     text,
    created_at timestamptz,
    updated_at timestamptz
);
CREATE INDEX coupon_view_user_status_idx ON coupon_view (user_id, status, created_at DESC, id DESC);

CREATE TABLE voucher_view
(
    id         text PRIMARY KEY,
    version    bigint      NOT NULL,
    doc        jsonb       NOT NULL,
    user_id    text,
    status     text,
    created_at timestamptz,
    updated_at timestamptz
);

CREATE TABLE product_view
(
    id         text PRIMARY KEY,
    version    bigint      NOT NULL,
    doc        jsonb       NOT NULL,
    user_id    text,
    status     text,
    created_at timestamptz,
    updated_at timestamptz
);

-- Where each projection's live consumer is, committed in the same
-- transaction as the view rows of each batch. The row is also the lock the
-- replay takes to pause the daemon while it swaps tables.
CREATE TABLE projection_checkpoints
(
    projection      text PRIMARY KEY,
    stream_sequence bigint      NOT NULL DEFAULT 0,
    global_position bigint,
    recorded_at     timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Events a projection gave up on after its retries (also on the dead-letter
-- stream): the document they belong to was left as it was.
CREATE TABLE projection_dead_letters
(
    projection   text        NOT NULL,
    event_id     uuid        NOT NULL,
    aggregate_id text        NOT NULL,
    sequence     bigint      NOT NULL,
    event_type   text        NOT NULL,
    error        text        NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, event_id)
);
