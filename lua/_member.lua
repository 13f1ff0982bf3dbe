-- (included by accept.lua and accept_k.lua) a group send: KEYS[MEM] is the
-- group's member hash; the sender (from) must be an active member
-- ("<since>", not "<since>:<until>").
if KEYS[MEM] then
  local m = redis.call('HGET', KEYS[MEM], from)
  if not m then
    if redis.call('EXISTS', KEYS[MEM]) == 0 then return redis.status_reply('not_found') end
    return redis.status_reply('forbidden')
  end
  if string.find(m, ':', 1, true) then return redis.status_reply('forbidden') end
end
