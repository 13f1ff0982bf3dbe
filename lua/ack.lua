-- ack: devices acknowledge their users' event streams up to a cursor; one
-- call applies the acks of one or more users (the module groups the acks
-- of one chat_ack_delay tick: one script call instead of one per user).
-- KEYS:    per user u (0-based), at 4u+1..4u+4: chat:{u:U}:acked
--          chat:{u:U}:inbox  chat:{u:U}:dlv  chat:{u:U}:cur
--          (on a Redis Cluster every user of one call is in one slot; the
--          module sends one user per call there)
-- ARGV:    per user u, at 3u+1..3u+3: device  cursor  user
-- returns: one table per user, in order: {conv, seq, prev, ...}, the
--          delivered receipts to emit (seq the new delivered pointer, prev
--          the one before).
-- guarantees: per user, as if applied one call each: a cursor only moves
--          forward and never past the user's highest cursor; delivered
--          pointers only move forward; the inbox keeps what some device
--          has not acknowledged and drops the rest.
local res = {}
for u = 0, #KEYS / 4 - 1 do
  local ACKED, INBOX, DLV, CUR = KEYS[4 * u + 1], KEYS[4 * u + 2], KEYS[4 * u + 3], KEYS[4 * u + 4]
  local dev, user = ARGV[3 * u + 1], ARGV[3 * u + 3]
  local out = {}
  local prev = tonumber(redis.call('HGET', ACKED, dev) or '0')
  local n = tonumber(ARGV[3 * u + 2])
  local top = tonumber(redis.call('GET', CUR) or '0')
  if n > top then n = top end
  if n > prev then
    redis.call('HSET', ACKED, dev, n)
    local best, order = {}, {}
    for _, ev in ipairs(redis.call('ZRANGEBYSCORE', INBOX, '(' .. prev, n)) do
      local ok, e = pcall(cjson.decode, ev)
      if ok and e.type == 'msg' and e.from ~= user then
        if not best[e.conv] then table.insert(order, e.conv) end
        if not best[e.conv] or e.seq > best[e.conv] then best[e.conv] = e.seq end
      end
    end
    for _, conv in ipairs(order) do
      local d = tonumber(redis.call('HGET', DLV, conv) or '0')
      if best[conv] > d then
        redis.call('HSET', DLV, conv, best[conv])
        table.insert(out, conv)
        table.insert(out, string.format('%d', best[conv]))
        table.insert(out, string.format('%d', d))
      end
    end
    local min = n
    for _, v in ipairs(redis.call('HVALS', ACKED)) do
      local x = tonumber(v)
      if x < min then min = x end
    end
    redis.call('ZREMRANGEBYSCORE', INBOX, '-inf', min)
  end
  res[u + 1] = out
end
return res
