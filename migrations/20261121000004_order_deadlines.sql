-- Durable payment timeouts: one row per order awaiting payment, written when
-- the order is placed (by the order lifecycle reactor, idempotently) and
-- fired by whichever command process polls first (FOR UPDATE SKIP LOCKED).
-- Nothing lives only in memory: after an outage, overdue rows fire, and the
-- Order aggregate decides (a paid or cancelled order ignores its timeout).
CREATE TABLE order_deadlines
(
    order_id  text PRIMARY KEY,
    due_at    timestamptz NOT NULL,
    attempts  integer     NOT NULL DEFAULT 0,
    last_error text
);

CREATE INDEX order_deadlines_due_idx ON order_deadlines (due_at);
