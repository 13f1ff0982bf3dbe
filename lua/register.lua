-- register: a session joins its user's registry (WebSocket handshake,
-- long-poll request).
-- KEYS:    1 chat:{u:U}:conns  2 chat:{u:U}:acked  3 chat:{u:U}:last
--          4 chat:{u:U}:set
-- ARGV:    1 member "<worker channel>|<device>|<session id>"  2 now (ms)
--          3 ttl (ms)  4 max sessions of the user  5 user  6 device
--          7 "s" on a Redis Cluster (sharded pub/sub), else absent
-- returns: {sessions including this one, the device's acked cursor, the
--          inbox trim point}, or {-1, '0', '0'} when the user already has
--          max sessions.
-- guarantees: chat_max_connections_per_user across every server; the
--          first session announces the user online unless the user's
--          settings say last_seen nobody; a new device starts at cursor 0;
--          the trim point (newest cursor the inbox dropped unacknowledged)
--          lets hello say "behind".
local now = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local n = redis.call('ZCARD', KEYS[1])
if n >= tonumber(ARGV[4]) then return {-1, '0', '0'} end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[3]))
local SET, USER, SHARDED = KEYS[4], ARGV[5], ARGV[7] == 's'
-- @include _online.lua
redis.call('HSETNX', KEYS[2], ARGV[6], 0)
local acked = redis.call('HGET', KEYS[2], ARGV[6])
return {n + 1, acked, redis.call('HGET', KEYS[3], 'trim') or '0'}
