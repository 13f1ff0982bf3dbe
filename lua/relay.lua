-- relay: an ephemeral event to the worker processes holding a connection
-- of the recipient (a typing indicator; a direct conversation's delivered
-- receipt, live only, PROTOCOL 7).
-- KEYS:    1 chat:{u:R}:conns
-- ARGV:    1 now (ms)  2 recipient  3 the event JSON
--          4 "s" on a Redis Cluster, else absent
-- returns: the number of worker channels published to; with "s" instead
--          {payload, channel...} unpublished: a script may SPUBLISH only
--          to its own slot, so the caller SPUBLISHes to each channel.
-- guarantees: one PUBLISH per worker process, not per session; nothing is
--          stored; expired entries get nothing.
local members = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf')
local seen = {}
local n = 0
local payload = ARGV[2] .. '\n' .. ARGV[3]
local out = {payload}
for _, m in ipairs(members) do
  local ch = string.match(m, '^([^|]+)|')
  if ch and not seen[ch] then
    seen[ch] = true
    if ARGV[4] == 's' then
      out[#out + 1] = ch
    else
      redis.call('PUBLISH', ch, payload)
    end
    n = n + 1
  end
end
if ARGV[4] == 's' then return out end
return n
