-- The ledger holds a version of a record: raise `synced` (never lower it), take the ledger's
-- limit, and once the record is clean give it the cache TTL and drop it from the dirty index.
-- The TTL runs from the record's load ('at'), not from now: a busy provider, whose record
-- turns dirty and clean over and over, still reloads what other writers added to its
-- document (a record loaded longer than the TTL ago goes at once). A record written by an
-- older quotad, without 'at', gets the whole TTL from now, and 'at' now: the TTL runs from
-- here on (otherwise a provider that stays busy would never reload).
-- KEYS[1] record hash, KEYS[2] dirty index, KEYS[3] idempotency records not yet in the ledger
-- ARGV[1] epoch, ARGV[2] version, ARGV[3] limit, ARGV[4] TTL seconds, ARGV[5] provider id,
-- ARGV[6..] ids of the idempotency records the ledger now holds
-- Returns 1 when the record is clean now (or gone); 0 when it is still dirty; 2 when it is
-- still dirty and was loaded more than the TTL ago (or has no 'at'): it never expires, so
-- the caller rebases it to take in what other writers added; 3 when the provider's record
-- is of another epoch.
for i = 6, #ARGV do redis.call('HDEL', KEYS[3], ARGV[i]) end
local v = redis.call('HMGET', KEYS[1], 'epoch', 'ver', 'synced', 'at')
if not v[1] then
  redis.call('ZREM', KEYS[2], ARGV[5])
  return 1
end
if v[1] ~= ARGV[1] then return 3 end
local synced = math.max(tonumber(v[3]), tonumber(ARGV[2]))
redis.call('HSET', KEYS[1], 'synced', string.format('%d', synced), 'limit', ARGV[3])
local at, ttl_ms = tonumber(v[4]), tonumber(ARGV[4]) * 1000
local function now_ms()
  local t = redis.call('TIME')
  return t[1] * 1000 + math.floor(t[2] / 1000)
end
if synced >= tonumber(v[2]) then
  if at then
    redis.call('PEXPIREAT', KEYS[1], string.format('%d', at + ttl_ms))
  else
    redis.call('HSET', KEYS[1], 'at', string.format('%d', now_ms()))
    redis.call('EXPIRE', KEYS[1], ARGV[4])
  end
  redis.call('ZREM', KEYS[2], ARGV[5])
  return 1
end
if at and now_ms() < at + ttl_ms then return 0 end
return 2
