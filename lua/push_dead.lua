-- push_dead: drop a registration the provider declared dead (the push
-- role).
-- KEYS:    1 chat:{u:U}:push
-- ARGV:    1 device  2 the registration that failed
-- returns: 1 when removed, 0 when it changed meanwhile.
-- guarantees: a device that registered again since is kept.
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0
