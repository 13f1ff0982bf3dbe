-- fanout_lease: take, renew or give back the lease of one shard (the
--          fanout role with the Redis queue: one fan-out worker serves a
--          shard at a time, the one holding its lease).
-- KEYS:    1 chat:{s<s>}:lease
-- ARGV:    1 owner (the worker: "<consumer>:<node>:<pid>:<start ms>")
--          2 ttl (ms): take or renew for this long; 0: give it back
-- returns: with a ttl: 2 taken (it was free or had expired), 1 renewed (it
--          was ours), 0 another worker holds it (nothing changed); with 0:
--          1 given back, 0 it was not ours (nothing changed).
-- guarantees: only the holder renews or gives back; a lease nobody renews
--          is free after ttl (Redis's clock), never before.
local cur = redis.call('GET', KEYS[1])
local ttl = tonumber(ARGV[2])
if ttl == 0 then
  if cur == ARGV[1] then
    redis.call('DEL', KEYS[1])
    return 1
  end
  return 0
end
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ttl)
  return 1
end
if cur then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
return 2
