-- accept_k: a send with the Kafka queue (dedup and seq in Redis).
-- KEYS:    1 chat:{s<s>}:dd:<sender>:<client_id>  2 chat:{s<s>}:seq
--          and for a group: 3 chat:{s<s>}:g:<G>:mem  4 chat:{s<s>}:g:<G>:snd
-- ARGV:    as accept.lua
-- returns: {1, rec, record} to produce ("id|seq|ts|conv" and the record
--          JSON), or {0, rec} when it was produced before; the status
--          not_found / forbidden (group).
-- guarantees: the record is kept with the dedup entry until the broker
--          has acknowledged it (the module then drops the copy), so a retry
--          produces the same bytes with the same seq.
local conv, id, ts, ttl, pre, suf, from, dev, tofield, to =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local d = redis.call('GET', KEYS[1])
if d then
  local nl = string.find(d, '\n', 1, true)
  if nl then return {1, string.sub(d, 1, nl - 1), string.sub(d, nl + 1)} end
  return {0, d}
end
local MEM = 3
-- @include _member.lua
local seq = redis.call('HINCRBY', KEYS[2], conv, 1)
if KEYS[4] then redis.call('ZADD', KEYS[4], seq, from) end
local rec = id .. '|' .. seq .. '|' .. ts .. '|' .. conv
local p = {t = 'msg', conv = conv, from = from, dev = dev,
  seq = tostring(seq), ev = pre .. seq .. suf}
p[tofield] = to
local record = cjson.encode(p)
redis.call('SET', KEYS[1], rec .. '\n' .. record, 'EX', tonumber(ttl))
return {1, rec, record}
