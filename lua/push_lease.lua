-- push_lease: take the due notifications of a bucket (the push role).
-- KEYS:    1 chat:{pq<b>}:due
-- ARGV:    1 now (ms)  2 lease (the time they come back if not done)
--          3 limit
-- returns: the members taken.
-- guarantees: a worker that dies with entries in hand loses none: they are
--          due again at the lease.
local m = redis.call('ZRANGE', KEYS[1], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[3]))
for _, x in ipairs(m) do redis.call('ZADD', KEYS[1], ARGV[2], x) end
return m
