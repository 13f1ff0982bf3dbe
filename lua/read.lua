-- read: move a user's read pointer of a conversation.
-- KEYS:    1 chat:{u:U}:read   and for a direct conversation:
--          2 chat:{u:U}:last
-- ARGV:    1 conv  2 seq  3 cap (groups: the group's last seq, read on its
--          shard; absent for a direct conversation)
-- returns: {the pointer before, or -1 when it did not move; the stored
--          (capped) seq}
-- guarantees: a read pointer only moves forward and never passes the
--          conversation's last seq (direct: the newest seq appended to the
--          reader's inbox for it, last m:<conv>, since both participants
--          get every message), so a read cannot mark later messages read.
local n = tonumber(ARGV[2])
local cap = tonumber(ARGV[3] or '')
if not cap then
  local l = KEYS[2] and redis.call('HGET', KEYS[2], 'm:' .. ARGV[1])
  cap = tonumber(l and string.match(l, '^(%d+)') or '0')
end
if n > cap then n = cap end
local p = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if n > p then
  redis.call('HSET', KEYS[1], ARGV[1], string.format('%d', n))
  return {p, n}
end
return {-1, n}
