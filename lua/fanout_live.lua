-- fanout_live: the fan-out workers alive (the fanout role with the Redis
--          queue; each holds about shards / alive of the shard leases).
-- KEYS:    1 chat:{fanout}:live (sorted set: worker -> expiry, Redis ms)
-- ARGV:    1 owner (as in fanout_lease.lua)
--          2 ttl (ms): alive for this long from now; 0: gone (a clean stop)
-- returns: the number of workers alive (this one included unless gone).
-- guarantees: a worker that stops renewing counts no more after ttl;
--          expiry is Redis's clock, so workers' clocks need not agree.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
if ttl == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ttl * 4)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
