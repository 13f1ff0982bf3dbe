-- read: move a user's read pointer of a conversation.
-- KEYS:    1 chat:{u:U}:read
-- ARGV:    1 conv  2 seq  3 cap: the conversation's last seq (its seq
--          counter, chat:{s<s>}:seq, read on its shard just before)
-- returns: {the pointer before, or -1 when it did not move; the stored
--          (capped) seq}
-- guarantees: a read pointer only moves forward and never passes the
--          conversation's last seq, so a read cannot mark later messages
--          read.
local n = tonumber(ARGV[2])
local cap = tonumber(ARGV[3])
if n > cap then n = cap end
local p = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if n > p then
  redis.call('HSET', KEYS[1], ARGV[1], string.format('%d', n))
  return {p, n}
end
return {-1, n}
