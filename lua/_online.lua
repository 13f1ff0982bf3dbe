-- (included by register.lua and refresh.lua) the user's first live
-- session: announce the user online on chat:p:<USER>, unless the settings
-- hash SET says last_seen nobody.
if n == 0 and redis.call('HGET', SET, 'last_seen') ~= 'nobody' then
  redis.call('PUBLISH', 'chat:p:' .. USER,
    '{"type":"presence","user":"' .. USER .. '","online":true,"last_seen":null}')
end
