-- Consume or refund, atomically with the idempotency record.
-- KEYS[1] record hash, KEYS[2] idempotency key, KEYS[3] dirty index (sorted set; the one
--         key outside the provider's slot: on Redis Cluster it would be sharded by slot),
-- KEYS[4] idempotency records not yet in the ledger (hash: id -> entry with expiry ms)
-- ARGV[1] 'c' consume | 'r' refund, ARGV[2] amount, ARGV[3] '1' when KEYS[2] is used,
-- ARGV[4] idempotency TTL seconds, ARGV[5] provider id (member of the dirty index),
-- ARGV[6] deadline in Redis ms ('0': none): a script run later changes nothing, because
--         its sender has stopped waiting and decided from Firestore instead
-- ARGV[7] the key's id (field of KEYS[4])
-- A keyed decision makes the record dirty even when usage is unchanged: the key travels to
-- the ledger with the next write, so a retry that Firestore decides is answered too.
-- Returns {'late'} | {'miss'} | {'reused'} | {'replay'|'ok', allowed 0/1, used, limit}
local function s(n) return string.format('%d', n) end
local t = redis.call('TIME')
local now_ms = t[1] * 1000 + math.floor(t[2] / 1000)
if ARGV[6] ~= '0' and now_ms > tonumber(ARGV[6]) then return {'late'} end
local amount = tonumber(ARGV[2])
if ARGV[3] == '1' then
  local prior = redis.call('GET', KEYS[2])
  if prior then
    local first, allowed, used, limit = string.match(prior, '^(%d+):(%d):(%d+):(%d+)$')
    if first ~= ARGV[2] then return {'reused'} end
    return {'replay', tonumber(allowed), tonumber(used), tonumber(limit)}
  end
end
local v = redis.call('HMGET', KEYS[1], 'used', 'limit', 'ver')
if not v[1] then return {'miss'} end
local used, limit, ver = tonumber(v[1]), tonumber(v[2]), tonumber(v[3])
local allowed, new_used = 1, used
if ARGV[1] == 'c' then
  if used + amount > limit then allowed = 0 else new_used = used + amount end
else
  new_used = math.max(0, used - amount)
end
if new_used ~= used or ARGV[3] == '1' then
  redis.call('HSET', KEYS[1], 'used', s(new_used), 'ver', s(ver + 1))
  redis.call('PERSIST', KEYS[1])
  redis.call('ZADD', KEYS[3], 'NX', s(now_ms), ARGV[5])
end
if ARGV[3] == '1' then
  local answer = ARGV[2] .. ':' .. allowed .. ':' .. s(new_used) .. ':' .. s(limit)
  redis.call('SET', KEYS[2], answer, 'EX', ARGV[4])
  redis.call('HSET', KEYS[4], ARGV[7], answer .. ':' .. s(now_ms + tonumber(ARGV[4]) * 1000))
  redis.call('PEXPIRE', KEYS[4], s(tonumber(ARGV[4]) * 1000))
end
return {'ok', allowed, new_used, limit}
