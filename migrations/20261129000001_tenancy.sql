-- Tenancy (API.md "Tenancy"): every view row names the merchant it belongs
-- to, so every merchant-facing query is scoped in SQL by an always-ANDed
-- `merchant_id = $caller` predicate, as customer queries are by `user_id`.
-- Views keep one shape so one writer serves them all (NULL where a view has
-- no merchant, e.g. coupons). Rows written before this column existed are
-- filled by the next replay (`replay --projection all`).

ALTER TABLE order_view ADD COLUMN merchant_id text;
ALTER TABLE coupon_view ADD COLUMN merchant_id text;
ALTER TABLE voucher_view ADD COLUMN merchant_id text;
ALTER TABLE product_view ADD COLUMN merchant_id text;

-- a merchant's orders, newest first (the order list), keyset-paginated
CREATE INDEX order_view_merchant_created_idx ON order_view (merchant_id, created_at DESC, id DESC);
-- a merchant's kitchen queue: paid orders, oldest payment first
CREATE INDEX order_view_merchant_status_updated_idx ON order_view (merchant_id, status, updated_at, id);
