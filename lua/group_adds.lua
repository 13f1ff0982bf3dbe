-- group_adds: how often a user was added to groups by others, in the
-- current hour and day (fixed windows; the rest role).
-- KEYS:    1 chat:{u:X}:adds (hash hw, hn, dw, dn)
-- ARGV:    1 hour number  2 day number  3 max an hour  4 max a day
--          5 "take" or "give" (a refused change gives back what it took)
-- returns: 0, or 1 (the hour is full), 2 (the day is full).
-- guarantees: nobody is added to more groups by others than the limits,
--          across every server.
local s = redis.call('HMGET', KEYS[1], 'hw', 'hn', 'dw', 'dn')
local hn = (s[1] == ARGV[1]) and tonumber(s[2]) or 0
local dn = (s[3] == ARGV[2]) and tonumber(s[4]) or 0
if ARGV[5] == 'give' then
  if hn > 0 then hn = hn - 1 end
  if dn > 0 then dn = dn - 1 end
else
  if hn >= tonumber(ARGV[3]) then return 1 end
  if dn >= tonumber(ARGV[4]) then return 2 end
  hn = hn + 1
  dn = dn + 1
end
redis.call('HSET', KEYS[1], 'hw', ARGV[1], 'hn', hn, 'dw', ARGV[2], 'dn', dn)
redis.call('PEXPIRE', KEYS[1], 2 * 86400000)
return 0
