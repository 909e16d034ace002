-- Settles one order's unit, exactly once: the released set is the guard, so
-- a redelivered release finds nothing to settle.
--
-- KEYS[1] meta  KEYS[2] buyers  KEYS[3] released (set of settled order ids)
-- ARGV[1] order id  ARGV[2] its user id  ARGV[3] "1" to give the unit back to
-- the sale, "0" to only mark it settled (the event store refused the claim
-- as sold out: the unit the gate took does not exist)
--
-- Returns 1 re-credited, 2 settled without credit, 0 nothing held (not this
-- user's order here, or already settled), -1 not loaded (a re-warm reads the
-- release from the event store).
local layout = redis.call('HGET', KEYS[1], 'layout')
if layout ~= '2' then
  return -1
end
if redis.call('HGET', KEYS[2], ARGV[2]) ~= ARGV[1] then
  return 0
end
if redis.call('SADD', KEYS[3], ARGV[1]) == 0 then
  return 0
end
if ARGV[3] == '1' then
  redis.call('HINCRBY', KEYS[1], 'left', 1)
  return 1
end
return 2
