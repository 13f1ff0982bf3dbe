-- ack: a device acknowledges its user's event stream up to a cursor.
-- KEYS:    1 chat:{u:U}:acked  2 chat:{u:U}:inbox  3 chat:{u:U}:dlv
--          4 chat:{u:U}:cur
-- ARGV:    1 device  2 cursor  3 user
-- returns: {conv, seq, prev, ...}: the delivered receipts to emit (seq the
--          new delivered pointer, prev the one before).
-- guarantees: a cursor only moves forward and never past the user's
--          highest cursor; delivered pointers only move forward; the inbox
--          keeps what some device has not acknowledged and drops the rest.
-- one HGETALL gives this device's previous cursor and every other
-- device's, for the trim below (one call fewer than HGET and HVALS)
local all = redis.call('HGETALL', KEYS[1])
local prev, others = 0, {}
for i = 1, #all, 2 do
  if all[i] == ARGV[1] then prev = tonumber(all[i + 1]) or 0
  else others[#others + 1] = tonumber(all[i + 1]) end
end
local n = tonumber(ARGV[2])
local top = tonumber(redis.call('GET', KEYS[4]) or '0')
if n > top then n = top end
if n <= prev then return {} end
redis.call('HSET', KEYS[1], ARGV[1], n)
local best, order, out = {}, {}, {}
for _, ev in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. prev, n)) do
  local ok, e = pcall(cjson.decode, ev)
  if ok and e.type == 'msg' and e.from ~= ARGV[3] then
    if not best[e.conv] then table.insert(order, e.conv) end
    if not best[e.conv] or e.seq > best[e.conv] then best[e.conv] = e.seq end
  end
end
for _, conv in ipairs(order) do
  local d = tonumber(redis.call('HGET', KEYS[3], conv) or '0')
  if best[conv] > d then
    redis.call('HSET', KEYS[3], conv, best[conv])
    table.insert(out, conv)
    table.insert(out, string.format('%d', best[conv]))
    table.insert(out, string.format('%d', d))
  end
end
local min = n
for _, x in ipairs(others) do
  if x < min then min = x end
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', min)
return out
