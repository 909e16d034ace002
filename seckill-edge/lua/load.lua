-- Loads a seckill voucher's state, unless it is live in this layout: a
-- warm-up never overwrites live state, and a re-warm after data loss (or of
-- a voucher an older edge loaded) rebuilds it from the event store's
-- decisions, never from a bare stock number.
--
-- KEYS[1] meta  KEYS[2] buyers  KEYS[3] released  KEYS[4] stream
-- KEYS[5] the older layout's reservations hash (deleted)
-- ARGV[1] stock  ARGV[2] left  ARGV[3] begins (unix ms)  ARGV[4] ends (unix ms)
-- ARGV[5] event-store version  ARGV[6] forwarder group name
-- then groups of 3: user id, order id, "1" if the order still holds a unit
--
-- Returns 1 when loaded, 0 when the voucher was already live.
if redis.call('HGET', KEYS[1], 'layout') == '2' then
  return 0
end
-- Partial leftovers (eviction, an older layout) are rebuilt from the event
-- store. The stream is kept: entries in it are admitted requests the
-- forwarder still owes.
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[5])
for i = 7, #ARGV, 3 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  if ARGV[i + 2] ~= '1' then
    redis.call('SADD', KEYS[3], ARGV[i + 1])
  end
end
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'left', ARGV[2], 'stock', ARGV[1], 'begins', ARGV[3], 'ends', ARGV[4],
  'version', ARGV[5], 'loaded_at', t[1], 'layout', '2')
-- fails with BUSYGROUP when the stream and its group survived: keep them
pcall(redis.call, 'XGROUP', 'CREATE', KEYS[4], ARGV[6], '0', 'MKSTREAM')
return 1
