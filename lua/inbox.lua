-- inbox: append one event to a recipient's inbox (the fan-out role).
-- KEYS:    1 chat:{u:U}:inbox  2 chat:{u:U}:cur  3 chat:{u:U}:last
--          4 chat:{u:U}:conns  5 chat:{u:U}:ages  6 chat:{u:U}:acked
-- ARGV:    1 field (m:<conv> for messages and group events, r:<status>:<conv>:<by>
--          for receipts)  2 seq  3 event JSON without its cursor  4 now (ms)
--          5 inbox_max  6 retention (ms)  7 the acting device of the user's
--          own copy ("" for any other recipient)
-- returns: {appended 1/0, cursor (0: nothing to publish: a duplicate
--          already trimmed, or an own copy no device needs), live registry
--          members...}
-- guarantees: exactly once per event and recipient: last[field] =
--          "<seq>:<cursor>" of the newest appended, an equal seq is a
--          re-consumed entry (nothing added, the cursor returned so it is
--          published again); skipped seqs (Kafka order, a reclaimed entry)
--          are remembered in last["h:<conv>"] (at most 64) so a late one is
--          still appended;
--          the inbox keeps at most inbox_max events and none older than the
--          retention (hourly age markers in ages, last["mk"]), and the newest
--          cursor dropped unacknowledged goes to last["trim"] (hello's
--          "behind"); expiry renewed with the markers.
--          The user's own copy (ARGV[7] set) is appended only when a device
--          other than the acting one has ever registered (a field of
--          acked): no device could replay it otherwise, so no cursor is
--          spent and nothing is published; last[field] then records
--          "<seq>:<cursor of the newest appended>:s" (the push check still
--          finds the newest cursor, a re-consumed entry is still a duplicate).
local seq = tonumber(ARGV[2])
local got = redis.call('HMGET', KEYS[3], ARGV[1], 'mk')
local prev = got[1]
local pseq, pcur = 0, 0
local pskip = false
if prev then
  local a, b, sk = string.match(prev, '^(%d+):(%d+)(:?s?)$')
  pseq, pcur, pskip = tonumber(a), tonumber(b), sk == ':s'
end
local res
local msg = string.sub(ARGV[1], 1, 2) == 'm:'
local hf = 'h' .. string.sub(ARGV[1], 2)
if pseq == seq then
  res = {0, pskip and 0 or pcur}
  if pskip then return res end
elseif pseq > seq then
  local found, rest = false, {}
  local h = msg and redis.call('HGET', KEYS[3], hf)
  if h then
    for x in string.gmatch(h, '%d+') do
      if tonumber(x) == seq then found = true else rest[#rest + 1] = x end
    end
  end
  if not found then
    local c = redis.call('ZSCORE', KEYS[1], ARGV[3])
    if not c then return {0, 0} end
    res = {0, tonumber(c)}
  elseif #rest > 0 then redis.call('HSET', KEYS[3], hf, table.concat(rest, ','))
  else redis.call('HDEL', KEYS[3], hf) end
end
local skip = false
if not res and ARGV[7] ~= '' then
  local nd = redis.call('HLEN', KEYS[6])
  skip = nd == 0 or (nd == 1 and redis.call('HEXISTS', KEYS[6], ARGV[7]) == 1)
end
if not res then
  local cur = pcur
  if not skip then
    cur = redis.call('INCR', KEYS[2])
    redis.call('ZADD', KEYS[1], cur, ARGV[3])
  end
  if seq > pseq then
    local new = redis.call('HSET', KEYS[3], ARGV[1], ARGV[2] .. ':' .. string.format('%d', cur) .. (skip and ':s' or ''))
    -- a new field of a hash without age markers (a sender who never
    -- gets an append): it may be a new hash, which must expire
    if skip and new == 1 and not got[2] then redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[6])) end
    if msg and seq > pseq + 1 then
      local hs = {}
      local h = redis.call('HGET', KEYS[3], hf)
      if h then for x in string.gmatch(h, '%d+') do hs[#hs + 1] = x end end
      for x = math.max(pseq + 1, seq - 64), seq - 1 do hs[#hs + 1] = string.format('%d', x) end
      local from = math.max(1, #hs - 63)
      redis.call('HSET', KEYS[3], hf, table.concat(hs, ',', from, #hs))
    end
  end
  if skip then return {0, 0} end
  local n = redis.call('ZCARD', KEYS[1])
  local max = tonumber(ARGV[5])
  local trim = 0
  if n > max then
    trim = tonumber(redis.call('ZRANGE', KEYS[1], n - max - 1, n - max - 1, 'WITHSCORES')[2])
    redis.call('ZREMRANGEBYRANK', KEYS[1], 0, n - max - 1)
  end
  local now, ret = tonumber(ARGV[4]), tonumber(ARGV[6])
  if now - tonumber(got[2] or '0') >= 3600000 then
    redis.call('ZADD', KEYS[5], now, cur)
    redis.call('HSET', KEYS[3], 'mk', ARGV[4])
    local old = redis.call('ZREVRANGEBYSCORE', KEYS[5], now - ret, '-inf', 'WITHSCORES', 'LIMIT', 0, 1)
    if #old > 0 then
      local top = redis.call('ZREVRANGEBYSCORE', KEYS[1], '(' .. old[1], '-inf', 'WITHSCORES', 'LIMIT', 0, 1)
      if #top > 0 then
        if tonumber(top[2]) > trim then trim = tonumber(top[2]) end
        redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. old[1])
      end
      redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', '(' .. old[2])
    end
    redis.call('PEXPIRE', KEYS[5], ret)
    redis.call('PEXPIRE', KEYS[1], ret)
    redis.call('PEXPIRE', KEYS[3], ret)
  elseif n == 1 then
    redis.call('PEXPIRE', KEYS[1], ret)
  end
  if trim > 0 and trim > tonumber(redis.call('HGET', KEYS[3], 'trim') or '0') then
    redis.call('HSET', KEYS[3], 'trim', string.format('%d', trim))
  end
  res = {1, cur}
end
local m = redis.call('ZRANGEBYSCORE', KEYS[4], ARGV[4], '+inf')
for j = 1, #m do res[#res + 1] = m[j] end
return res
