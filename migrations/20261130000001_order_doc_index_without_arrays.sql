-- The GIN index on order documents serves the equality filters of
-- GET /orders (`doc @> {...}` on a handful of scalar fields), but it indexed
-- every value of every document, the items and the status history included:
-- about 2.9 KB of WAL per order document write, 44 % of the WAL of a goods
-- order run (docs/BENCHMARKS.md, 2026-11-30). No filter reads the arrays, so
-- the index now covers the document without them, and the filter queries the
-- same expression (query-api/src/filter.rs, DOC_INDEXED).
DROP INDEX IF EXISTS order_view_doc_idx;
CREATE INDEX order_view_doc_idx ON order_view USING gin ((doc - 'items' - 'history') jsonb_path_ops);
