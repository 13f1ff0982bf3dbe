-- accept: a send with the Redis Streams queue.
-- KEYS:    1 chat:{s<s>}:dd:<sender>:<client_id>  2 chat:{s<s>}:seq
--          3 chat:{s<s>}:in   and for a group: 4 chat:{s<s>}:g:<G>:mem
--          5 chat:{s<s>}:g:<G>:snd
-- ARGV:    1 conv  2 message id  3 ts (ms)  4 dedup ttl (s)
--          5 event prefix (up to "seq":)  6 event suffix (after the seq)
--          7 sender  8 sender's device  9 "to" or "group"  10 recipient
--          or group id
-- returns: "id|seq|ts|conv" (a retry gets the first send's), or the status
--          not_found / forbidden (group) with no seq consumed.
-- guarantees: dedup, (membership,) numbering and enqueue are one atomic
--          step: an acknowledged message has exactly one seq and is in the
--          stream; stream order is seq order within a conversation. The
--          client_id claim on {u:sender} (chat:{u:U}:cid:<client_id>,
--          checked before this script) makes a reused id a conflict.
local conv, id, ts, ttl, pre, suf, from, dev, tofield, to =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local d = redis.call('GET', KEYS[1])
if d then return d end
local MEM = 4
-- @include _member.lua
local seq = redis.call('HINCRBY', KEYS[2], conv, 1)
if KEYS[5] then redis.call('ZADD', KEYS[5], seq, from) end
redis.call('XADD', KEYS[3], '*', 't', 'msg', 'conv', conv,
  'from', from, 'dev', dev, tofield, to, 'seq', seq, 'ev', pre .. seq .. suf)
local rec = id .. '|' .. seq .. '|' .. ts .. '|' .. conv
redis.call('SET', KEYS[1], rec, 'EX', tonumber(ttl))
return rec
