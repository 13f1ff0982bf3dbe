-- unregister: a session leaves its user's registry.
-- KEYS:    1 chat:{u:U}:conns  2 chat:{u:U}:seen  3 chat:{u:U}:set
-- ARGV:    1 member  2 now (ms)  3 user
--          4 "s" on a Redis Cluster: SPUBLISH on chat:p:{u:<user>}
-- returns: 1 when the member was there, else 0.
-- guarantees: the last session's close records last seen and announces
--          the user offline (unless last_seen nobody); expired members of
--          crashed servers are swept on the way.
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[2]))
if removed == 1 and redis.call('ZCARD', KEYS[1]) == 0 then
  redis.call('SET', KEYS[2], ARGV[2])
  if redis.call('HGET', KEYS[3], 'last_seen') ~= 'nobody' then
    local msg = '{"type":"presence","user":"' .. ARGV[3] .. '","online":false,"last_seen":' .. ARGV[2] .. '}'
    if ARGV[4] == 's' then
      redis.call('SPUBLISH', 'chat:p:{u:' .. ARGV[3] .. '}', msg)
    else
      redis.call('PUBLISH', 'chat:p:' .. ARGV[3], msg)
    end
  end
end
return removed
