-- queue_start: where a worker role starts reading one shard's stream of
--          the Redis queue: its committed position (the id of the last
--          entry it processed), made the first time (workers/queue.c).
-- KEYS:    1 chat:{s<s>}:in (the stream)
--          2 chat:{s<s>}:pos:<role>
-- ARGV:    1 role: fanout, persist or push (also the name of the consumer
--            group earlier versions read the stream with)
--          2 where a role without a position starts: "0" at the first
--            entry still in the stream, "$" after the last one (push: it
--            has no business with what was queued before it first ran)
-- returns: the position, "0-0" for before the first entry
-- guarantees: a position once set is returned as it is. An earlier
--          version's consumer group of the role is taken over: the
--          position becomes the entry before its smallest pending entry
--          (those are read again), else its last delivered one, and the
--          group is destroyed (its pending list is no longer needed).
local pos = redis.call('GET', KEYS[2])
if pos then return pos end

-- the newest entry before `id` (exclusive), or "0-0"
local function before(id)
  local r = redis.call('XREVRANGE', KEYS[1], '(' .. id, '-', 'COUNT', 1)
  if r[1] then return r[1][1] end
  return '0-0'
end

local groups = redis.pcall('XINFO', 'GROUPS', KEYS[1])
if type(groups) == 'table' and not groups.err then
  for _, g in ipairs(groups) do
    local f = {}
    for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
    if f['name'] == ARGV[1] then
      pos = f['last-delivered-id']
      if tonumber(f['pending']) > 0 then
        local p = redis.call('XPENDING', KEYS[1], ARGV[1])
        pos = before(p[2])
      end
      redis.call('XGROUP', 'DESTROY', KEYS[1], ARGV[1])
    end
  end
end
if not pos then
  pos = '0-0'
  if ARGV[2] == '$' then
    local r = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
    if r[1] then pos = r[1][1] end
  end
end
redis.call('SET', KEYS[2], pos)
return pos
