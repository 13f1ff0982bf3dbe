-- presence: a user's state as another user (or the user) may see it.
-- KEYS:    1 chat:{u:U}:conns  2 chat:{u:U}:seen  3 chat:{u:U}:set
-- ARGV:    1 now (ms)  2 "1" when the viewer is U, else "0"
-- returns: {1, ''} online; {0, last seen ms or ''} offline.
-- guarantees: a user whose settings say last_seen nobody is offline and
--          never seen to everyone but themselves; expired entries of a
--          crashed server do not count as online.
if ARGV[2] ~= '1' and redis.call('HGET', KEYS[3], 'last_seen') == 'nobody' then
  return {0, ''}
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]))
if redis.call('ZCARD', KEYS[1]) > 0 then return {1, ''} end
return {0, redis.call('GET', KEYS[2]) or ''}
