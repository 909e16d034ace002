-- Settles one reservation, exactly once per order: the reservation record is
-- the guard, so a redelivered release finds nothing to settle.
--
-- KEYS[1] meta  KEYS[2] res
-- ARGV[1] order id  ARGV[2] "1" to give the unit back to the sale, "0" to
-- only drop the record (the event store refused the claim as sold out)
--
-- Returns 1 re-credited, 2 dropped without credit, 0 nothing held,
-- -1 not loaded (a re-warm reads the release from the event store).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
if redis.call('HDEL', KEYS[2], ARGV[1]) == 0 then
  return 0
end
if ARGV[2] == '1' then
  redis.call('HINCRBY', KEYS[1], 'left', 1)
  return 1
end
return 2
