-- Reloads a live record without dropping it (see Counters::rebase): if it is still of
-- epoch ARGV[1], it becomes epoch ARGV[4] with base ARGV[2] (the document's usage) and
-- carries what it holds above ARGV[3] (the document's watermark of ARGV[1], read with it),
-- never below 0 (the document stops at 0 when refunds pass it, and its watermark does not).
-- Refused as load.lua refuses a load: while a fence is held (KEYS[2]) or when the fence
-- generation (KEYS[3]) is no longer ARGV[5], read before the document (a Firestore decision
-- the document read may miss: the record would lose it, and its outdated mark with it).
-- KEYS[1] record hash; KEYS[4..] idempotency keys the ledger recorded, with ARGV[6..] their
-- answers and expiry (pairs: 'amount:allowed:used:limit', unix ms), set unless present
-- Returns 1 when rebased, 0 when the record is gone or of another epoch, or fenced.
local v = redis.call('HMGET', KEYS[1], 'epoch', 'used', 'ver', 'synced')
if v[1] ~= ARGV[1] then return 0 end
local t = redis.call('TIME')
local now_ms = t[1] * 1000 + math.floor(t[2] / 1000)
if redis.call('ZCOUNT', KEYS[2], '(' .. string.format('%d', now_ms), '+inf') > 0
    or (redis.call('GET', KEYS[3]) or '0') ~= ARGV[5] then
  return 0
end
local carried = tonumber(v[2]) - tonumber(ARGV[3])
local dirty = tonumber(v[3]) > tonumber(v[4])
redis.call('HSET', KEYS[1], 'epoch', ARGV[4], 'base', ARGV[2],
  'used', string.format('%d', math.max(0, tonumber(ARGV[2]) + carried)), 'from', ARGV[1],
  'ver', dirty and '1' or '0', 'synced', '0', 'fromw', ARGV[3],
  'at', string.format('%d', now_ms)) -- loaded now (see load.lua)
redis.call('HDEL', KEYS[1], 'outdated') -- it holds what the document holds now
for i = 4, #KEYS do
  redis.call('SET', KEYS[i], ARGV[2 * i - 2], 'PXAT', ARGV[2 * i - 1], 'NX')
end
return 1
