-- The reference of `./dev bench seckill_edge`'s script comparison: the
-- admission script of the "seed system" this project grew from, as it is
-- usually written (stock check, SISMEMBER, DECR, SADD, XADD), with its keys
-- passed in KEYS so it runs on a Redis Cluster too. Not used by the edge.
--
-- KEYS[1] stock (string)  KEYS[2] buyers (set)  KEYS[3] stream
-- ARGV[1] user id  ARGV[2] order id
-- Returns 0 admitted, 1 sold out, 2 already bought.
if tonumber(redis.call('GET', KEYS[1])) <= 0 then
  return 1
end
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then
  return 2
end
redis.call('INCRBY', KEYS[1], -1)
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('XADD', KEYS[3], '*', 'userId', ARGV[1], 'voucherId', KEYS[1], 'id', ARGV[2])
return 0
