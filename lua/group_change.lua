-- group_change: create a group or change its membership (the rest role).
-- KEYS:    1 chat:{s<s>}:g:<G>:meta  2 chat:{s<s>}:g:<G>:mem
--          3 chat:{s<s>}:seq  4 the queue (chat:{s<s>}:in, or chat:{s<s>}:gq
--          with Kafka)
-- ARGV:    1 op (create, change, get)  2 G  3 actor  4 now (ms)
--          5 group_max_members  6 group_push_limit  7 queue (redis, kafka)
--          8 name  9 add (JSON array)  10 remove (JSON array)
-- returns: {"ok", state, [field, record]...} (records: Kafka only), or
--          {code}: exists, not_found, forbidden, too_large.
-- guarantees: the check (exists, owner, self-removal, the member cap), the
--          seqs of the events, meta and mem and the queue entry are one
--          atomic step: a member is active from exactly one seq on, a
--          removed one until exactly one seq.
local meta, mem, seqk, q = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local op, g, actor, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local max, plimit, kafka = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7] == 'kafka'
local conv = 'g:' .. g
local name, owner, created
local act = {}
if op == 'create' then
  if redis.call('EXISTS', meta) == 1 then return {'exists'} end
  name, owner, created = ARGV[8], actor, now
else
  local m = redis.call('HMGET', meta, 'name', 'owner', 'created')
  if not m[1] then return {'not_found'} end
  name, owner, created = m[1], m[2], m[3]
  local all = redis.call('HGETALL', mem)
  for i = 1, #all, 2 do
    if not string.find(all[i + 1], ':', 1, true) then act[all[i]] = all[i + 1] end
  end
  if not act[actor] then return {'forbidden'} end
end
local function sorted(set)
  local l = {}
  for u in pairs(set) do l[#l + 1] = u end
  table.sort(l)
  return l
end
local function jlist(l)
  if #l == 0 then return '[]' end
  return '["' .. table.concat(l, '","') .. '"]'
end
local function state()
  local l, since = sorted(act), {}
  for _, u in ipairs(l) do since[#since + 1] = '"' .. u .. '":' .. act[u] end
  return '{"name":' .. cjson.encode(name) .. ',"owner":"' .. owner .. '","members":'
    .. jlist(l) .. ',"since":{' .. table.concat(since, ',') .. '},"created":' .. created .. '}', #l
end
if op == 'get' then
  return {'ok', (state())}
end
local add, rem = cjson.decode(ARGV[9]), cjson.decode(ARGV[10])
if op == 'create' then add[#add + 1] = actor end
if op ~= 'create' and actor ~= owner then
  if #add > 0 then return {'forbidden'} end
  for _, u in ipairs(rem) do if u ~= actor then return {'forbidden'} end end
end
local adds, rems, n = {}, {}, 0
for _ in pairs(act) do n = n + 1 end
for _, u in ipairs(add) do
  if not act[u] and not adds[u] then adds[u] = true; n = n + 1 end
end
if n > max then return {'too_large'} end
for _, u in ipairs(rem) do
  if (act[u] or adds[u]) and not rems[u] then rems[u] = true end
end
local out = {'ok', ''}
local function emit(event, set)
  local changed = sorted(set)
  if #changed == 0 then return end
  local seq = redis.call('HINCRBY', seqk, conv, 1)
  for _, u in ipairs(changed) do
    if event == 'removed' then
      redis.call('HSET', mem, u, act[u] .. ':' .. seq)
      act[u] = nil
    else
      redis.call('HSET', mem, u, seq)
      act[u] = tostring(seq)
    end
  end
  if not act[owner] then
    local best, bs
    for u, s in pairs(act) do
      local x = tonumber(s)
      if not best or x < bs or (x == bs and u < best) then best, bs = u, x end
    end
    if best then owner = best end
  end
  local st, count = state()
  redis.call('HSET', meta, 'name', name, 'owner', owner, 'n', count, 'ver', seq, 'created', created)
  local rc = {}
  if count > plimit then
    rc[actor] = true
  else
    for u in pairs(act) do rc[u] = true end
  end
  for _, u in ipairs(changed) do rc[u] = true end
  local rcpt = table.concat(sorted(rc), ' ')
  local ev = '{"type":"group","id":"' .. conv .. '#' .. seq .. '","conv":"' .. conv
    .. '","seq":' .. seq .. ',"group":"' .. g .. '","event":"' .. event .. '","members":'
    .. jlist(changed) .. ',"by":"' .. actor .. '","ts":' .. now .. '}'
  if kafka then
    local rec = cjson.encode({t = 'group', conv = conv, group = g, from = actor, seq = tostring(seq),
      event = event, rcpt = rcpt, state = st, ev = ev})
    redis.call('HSET', q, g .. '#' .. seq, now .. ' ' .. rec)
    out[#out + 1] = g .. '#' .. seq
    out[#out + 1] = rec
  else
    redis.call('XADD', q, '*', 't', 'group', 'conv', conv, 'group', g, 'from', actor, 'seq', seq,
      'event', event, 'rcpt', rcpt, 'state', st, 'ev', ev)
  end
end
emit(op == 'create' and 'created' or 'added', adds)
emit('removed', rems)
out[2] = (state())
return out
