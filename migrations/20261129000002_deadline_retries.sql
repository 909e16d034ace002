-- A payment deadline whose TimeOut fails is retried with backoff (retry_at),
-- not on every poll, and set aside for people (dead_lettered_at, with
-- last_error) once it can never succeed or has failed too often: nothing
-- retries forever. Set-aside rows stay in the table, visible and counted.
ALTER TABLE order_deadlines ADD COLUMN retry_at timestamptz;
ALTER TABLE order_deadlines ADD COLUMN dead_lettered_at timestamptz;
