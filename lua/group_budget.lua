-- group_budget: a token bucket per acting user of the rest role, shared by
-- every rest process (cw_rest_budget): group creations and membership
-- changes (chat:{u:U}:rl:groups), deletions (chat:{u:U}:rl:deletes).
-- KEYS:    1 chat:{u:U}:rl:<bucket> (hash t = ms of the last take, n = tokens)
-- ARGV:    1 now (ms)  2 per minute  3 burst
-- returns: 0 when a token was taken, else the ms until one is there.
-- guarantees: at most burst at once and the rate after that, across every
--          server; the key expires once the bucket would be full again.
local now, rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local s = redis.call('HMGET', KEYS[1], 't', 'n')
local t, n = tonumber(s[1]) or now, tonumber(s[2]) or burst
if now > t then n = math.min(burst, n + (now - t) * rate / 60000) end
if n < 1 then return math.ceil((1 - n) * 60000 / rate) end
redis.call('HSET', KEYS[1], 't', now, 'n', tostring(n - 1))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 60000 / rate) + 1000)
return 0
