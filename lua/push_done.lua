-- push_done: finish or reschedule a leased notification (the push role).
-- KEYS:    1 chat:{pq<b>}:due
-- ARGV:    1 member  2 the lease it was taken with  3 at (absent: remove)
-- returns: 1, or 0 when the entry was taken again or changed meanwhile.
-- guarantees: only the holder of a lease finishes it; a newer message for
--          the same conversation and device is not lost.
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not s or tonumber(s) ~= tonumber(ARGV[2]) then return 0 end
if ARGV[3] then redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1]) else redis.call('ZREM', KEYS[1], ARGV[1]) end
return 1
