-- tombstone: replace a deleted message's copies in one inbox (the fan-out
-- role, before it appends the deletion event itself with lua/inbox.lua).
-- KEYS:    1 chat:{u:U}:inbox
-- ARGV:    1 the message id  2 the deletion event JSON without its cursor
--          3 the message's ts (ms)  4 slack (ms): how far the events before
--          it may be older than the message (appends follow accepts)
-- returns: the number of inbox members replaced
-- guarantees: every copy of the message event (a member holding
--          "id":"<id>" as a field, with or without the own-copy prefix
--          {"!":"<device>",) newer than ts - slack is replaced, at the same
--          cursor (score), by the tombstone {"type":"msg","deleted":true,
--          + the deletion event's fields after its type} with the same
--          prefix: a device replaying after the deletion gets the tombstone
--          where the message was, no body, and its cursors have no hole. (It
--          differs from the deletion event, which inbox.lua then appends at
--          a new cursor: a zset holds a member once.) Deletion events are
--          left alone. The scan goes
--          from the newest member back, 200 at a time, and stops at the
--          first member older than ts - slack, so its cost is the events
--          since the message, not the inbox. Idempotent: a second run finds
--          its tombstones, which it rewrites to themselves.
local needle = '"id":"' .. ARGV[1] .. '"'
local oldest = tonumber(ARGV[3]) - tonumber(ARGV[4])
local body = '"type":"msg","deleted":true,' .. string.sub(ARGV[2], string.len('{"type":"deleted",') + 1)
local n, from = 0, 0
while true do
  local m = redis.call('ZREVRANGE', KEYS[1], from, from + 199, 'WITHSCORES')
  if #m == 0 then break end
  local stop = false
  for i = 1, #m, 2 do
    local e = m[i]
    local ts = string.match(e, '"ts":(%d+)}$')
    if ts and tonumber(ts) < oldest then stop = true break end
    if string.find(e, needle, 1, true) and not string.find(e, '"type":"deleted"', 1, true) then
      local pre = string.match(e, '^{"!":"[^"]*",') or '{'
      local new = pre .. body
      if new ~= e then
        redis.call('ZREM', KEYS[1], e)
        redis.call('ZADD', KEYS[1], m[i + 1], new)
      end
      n = n + 1
    end
  end
  if stop or #m < 400 then break end
  from = from + 200
end
return n
