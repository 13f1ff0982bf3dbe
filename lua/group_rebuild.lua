-- group_rebuild: one group's live state from its MongoDB document (the
-- rest role at start), unless Redis holds that version or a newer one.
-- KEYS:    1 chat:{s<s>}:g:<G>:meta  2 chat:{s<s>}:g:<G>:mem
--          3 chat:{s<s>}:seq
-- ARGV:    1 conv  2 ver  3 name  4 owner  5 created  6 top (the highest
--          seq MongoDB knows)  7.. member, since pairs
-- returns: 1 when rebuilt, 0 when Redis was as new.
-- guarantees: never older state over newer; the seq counter is raised to
--          top so no seq is given out twice.
local v = redis.call('HGET', KEYS[1], 'ver')
if v and tonumber(v) >= tonumber(ARGV[2]) then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
local n = 0
for i = 7, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  n = n + 1
end
redis.call('HSET', KEYS[1], 'name', ARGV[3], 'owner', ARGV[4], 'n', n, 'ver', ARGV[2], 'created', ARGV[5])
local s = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
if s < tonumber(ARGV[6]) then redis.call('HSET', KEYS[3], ARGV[1], ARGV[6]) end
return 1
