-- expire: remove expired messages' copies from one inbox (the persist
-- role's sweeper, workers/sweep.c, after it removed them from MongoDB).
-- KEYS:    1 chat:{u:U}:inbox
-- ARGV:    1 the newest ts (ms) of the messages  2 slack (ms)
--          3.. the message ids
-- returns: the number of inbox members removed
-- guarantees: every member holding "id":"<id>" as a field for one of the
--          ids (the message, its own copy, its tombstone, its deletion
--          event) is removed; the scan goes from the oldest member on, 200
--          at a time, and stops at the first member newer than the newest
--          ts + slack, so its cost is the events up to the expired ones
--          (which are the oldest), not the inbox. Cursors of later events
--          do not move.
local limit = tonumber(ARGV[1]) + tonumber(ARGV[2])
local needles = {}
for i = 3, #ARGV do needles[#needles + 1] = '"id":"' .. ARGV[i] .. '"' end
local n, from = 0, 0
while true do
  local m = redis.call('ZRANGE', KEYS[1], from, from + 199)
  if #m == 0 then break end
  local stop, kept = false, 0
  for i = 1, #m do
    local e = m[i]
    local ts = string.match(e, '"ts":(%d+)}$')
    if ts and tonumber(ts) > limit then stop = true break end
    local hit = false
    for j = 1, #needles do
      if string.find(e, needles[j], 1, true) then hit = true break end
    end
    if hit then
      redis.call('ZREM', KEYS[1], e)
      n = n + 1
    else
      kept = kept + 1
    end
  end
  if stop or #m < 200 then break end
  from = from + kept
end
return n
