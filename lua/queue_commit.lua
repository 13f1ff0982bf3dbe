-- queue_commit: a fan-out worker holding a shard's lease moves its
--          position on the shard's stream to the last entry of a batch
--          it processed (workers/queue.c; the roles without a lease use a
--          plain SET).
-- KEYS:    1 chat:{s<s>}:pos:fanout
--          2 chat:{s<s>}:lease
-- ARGV:    1 the entry's id (<ms>-<seq>)
--          2 owner: the lease holder we are (workers/lease.c)
-- returns: 1 the position is there (moved, or already at or past it),
--          0 refused: the lease is not ours (another worker serves the
--          shard now and reads from the position as it was)
-- guarantees: fencing: only the lease's holder moves the position, so a
--          worker that was paused past its lease cannot skip what the
--          next holder has not processed; it only moves forward.
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return 0 end
local cur = redis.call('GET', KEYS[1])
if cur then
  -- ids compare as two integers; as digit strings (no leading zeros) the
  -- longer is the larger, so no float rounding of a 64-bit part
  local function less(a, b)
    if #a ~= #b then return #a < #b end
    return a < b
  end
  local cm, cs = string.match(cur, '^(%d+)-(%d+)$')
  local nm, ns = string.match(ARGV[1], '^(%d+)-(%d+)$')
  if not nm then return redis.error_reply('ERR queue_commit: bad id ' .. ARGV[1]) end
  if cm and (less(nm, cm) or (nm == cm and not less(cs, ns))) then return 1 end
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
