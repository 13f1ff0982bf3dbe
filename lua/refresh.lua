-- refresh: a live session renews its registry entry (every third of the
-- registry TTL).
-- KEYS:    1 chat:{u:U}:conns  2 chat:{u:U}:set
-- ARGV:    1 member  2 now (ms)  3 ttl (ms)  4 user
--          5 "s" on a Redis Cluster (sharded pub/sub), else absent
-- returns: the number of other live members before this one.
-- guarantees: an entry lives while its server does and expires after at
--          most the TTL when it dies; a user whose entries had all expired
--          is announced online again (unless last_seen nobody).
local now = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local n = redis.call('ZCARD', KEYS[1])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[3]))
local SET, USER, SHARDED = KEYS[2], ARGV[4], ARGV[5] == 's'
-- @include _online.lua
return n
