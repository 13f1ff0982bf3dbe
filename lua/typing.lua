-- typing: relay an indicator to the worker processes holding a
-- connection of the recipient.
-- KEYS:    1 chat:{u:R}:conns
-- ARGV:    1 now (ms)  2 recipient  3 the typing event JSON
-- returns: the number of worker channels published to.
-- guarantees: one PUBLISH per worker process, not per session; nothing is
--          stored; expired entries get nothing.
local members = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf')
local seen = {}
local n = 0
for _, m in ipairs(members) do
  local ch = string.match(m, '^([^|]+)|')
  if ch and not seen[ch] then
    seen[ch] = true
    redis.call('PUBLISH', ch, ARGV[2] .. '\n' .. ARGV[3])
    n = n + 1
  end
end
return n
