-- (included by register.lua and refresh.lua) the user's first live
-- session: announce the user online on chat:p:<USER>, unless the settings
-- hash SET says last_seen nobody. SHARDED (Redis Cluster): SPUBLISH on
-- chat:p:{u:<USER>}, the user's own slot, the one this script runs on.
if n == 0 and redis.call('HGET', SET, 'last_seen') ~= 'nobody' then
  local msg = '{"type":"presence","user":"' .. USER .. '","online":true,"last_seen":null}'
  if SHARDED then
    redis.call('SPUBLISH', 'chat:p:{u:' .. USER .. '}', msg)
  else
    redis.call('PUBLISH', 'chat:p:' .. USER, msg)
  end
end
