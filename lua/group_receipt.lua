-- group_receipt: a member's delivered or read pointer in a group (the
-- fan-out role, docs/PIPELINE.md "Group receipts").
-- KEYS:    1 chat:{s<s>}:g:<G>:dlv  2 chat:{s<s>}:g:<G>:read
--          3 chat:{s<s>}:g:<G>:snd
-- ARGV:    1 member  2 seq  3 status (delivered or read)  4 prev (the
--          member's pointer before)
-- returns: the senders whose newest message is after prev (they learn
--          something new).
-- guarantees: pointers only move forward (read raises delivered too); one
--          receipt per member per ack or read, never one per message.
local n = tonumber(ARGV[2])
local function raise(k)
  if n > tonumber(redis.call('HGET', k, ARGV[1]) or '0') then redis.call('HSET', k, ARGV[1], n) end
end
raise(KEYS[1])
if ARGV[3] == 'read' then raise(KEYS[2]) end
return redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. ARGV[4], '+inf')
