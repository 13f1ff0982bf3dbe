-- push_enqueue: a message a recipient may need to be told of (the push
-- role, one call per recipient).
-- KEYS:    1 chat:{u:U}:pn  2 chat:{u:U}:push  3 chat:{u:U}:notify
--          4 chat:{u:U}:read
-- ARGV:    1 conv  2 seq  3 from  4 body (preview)  5 ts  6 name  7 pull
--          ("1": a group above group_push_limit)  8 pn ttl (ms)
-- returns: the user's registered devices (empty: nobody to notify).
-- guarantees: a message already read, or in a pull group the user did not
--          opt in to, notifies nobody; the unread seqs of the conversation
--          are kept (at most 100) for the count and the badge, and the
--          newest message for the text.
local regs = redis.call('HKEYS', KEYS[2])
if #regs == 0 then return regs end
if ARGV[7] == '1' and redis.call('HEXISTS', KEYS[3], ARGV[1]) == 0 then return {} end
local seq = tonumber(ARGV[2])
local rd = tonumber(redis.call('HGET', KEYS[4], ARGV[1]) or '0')
if seq <= rd then return {} end
local cur = redis.call('HGET', KEYS[1], ARGV[1])
local p = {seq = 0, seqs = {}}
if cur then p = cjson.decode(cur) end
local keep, have = {}, false
for _, s in ipairs(p.seqs) do
  if s == seq then have = true end
  if s > rd then keep[#keep + 1] = s end
end
if not have then keep[#keep + 1] = seq end
table.sort(keep)
while #keep > 100 do table.remove(keep, 1) end
p.seqs = keep
if seq >= p.seq then
  p.seq = seq; p.from = ARGV[3]; p.body = ARGV[4]; p.ts = tonumber(ARGV[5]); p.name = ARGV[6]
  p.pull = ARGV[7] == '1'
end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(p))
redis.call('PEXPIRE', KEYS[1], ARGV[8])
return regs
