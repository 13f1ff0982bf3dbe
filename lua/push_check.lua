-- push_check: at due time, whether a device still needs its notification
-- (the push role).
-- KEYS:    1 chat:{u:U}:push  2 chat:{u:U}:set  3 chat:{u:U}:mute
--          4 chat:{u:U}:acked  5 chat:{u:U}:read  6 chat:{u:U}:last
--          7 chat:{u:U}:conns  8 chat:{u:U}:pn
-- ARGV:    1 device  2 conv  3 now (ms)  4 check_conn ("1": a connected
--          device needs none)
-- returns: {'send', registration, unread in conv, badge, pn, preview, tz,
--          quiet} or {reason}: noreg, read, muted, later, acked, online.
-- guarantees: nothing is sent for what the device acknowledged or the user
--          read, for a muted conversation, or to a connected device.
local dev, conv, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local reg = redis.call('HGET', KEYS[1], dev)
if not reg then return {'noreg'} end
local pn = redis.call('HGET', KEYS[8], conv)
if not pn then return {'read'} end
local p = cjson.decode(pn)
local rd = tonumber(redis.call('HGET', KEYS[5], conv) or '0')
local n = 0
for _, s in ipairs(p.seqs) do if s > rd then n = n + 1 end end
if n == 0 then redis.call('HDEL', KEYS[8], conv); return {'read'} end
local mu = redis.call('HGET', KEYS[3], conv)
if mu and (mu == '0' or tonumber(mu) > now) then return {'muted'} end
if not p.pull then
  local last = redis.call('HGET', KEYS[6], 'm:' .. conv)
  if not last then return {'later'} end
  -- "<seq>:<cursor>", or "<seq>:<cursor>:s" after an own copy no device needed
  local a, b = string.match(last, '^(%d+):(%d+)')
  local lseq, lcur = tonumber(a), tonumber(b)
  if lseq < p.seq then return {'later'} end
  local ack = tonumber(redis.call('HGET', KEYS[4], dev) or '0')
  if ack >= lcur then return {'acked'} end
end
if ARGV[4] == '1' or p.pull then
  for _, m in ipairs(redis.call('ZRANGE', KEYS[7], now, '+inf', 'BYSCORE')) do
    if string.find(m, '|' .. dev .. '|', 1, true) then return {'online'} end
  end
end
local badge, all = 0, redis.call('HGETALL', KEYS[8])
for i = 1, math.min(#all, 400), 2 do
  local q = cjson.decode(all[i + 1])
  local r2 = tonumber(redis.call('HGET', KEYS[5], all[i]) or '0')
  for _, s in ipairs(q.seqs) do if s > r2 then badge = badge + 1 end end
end
local st = redis.call('HMGET', KEYS[2], 'preview', 'tz', 'quiet')
return {'send', reg, n, badge, pn, st[1] or '0', st[2] or 'UTC', st[3] or ''}
