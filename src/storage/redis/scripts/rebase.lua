-- Reloads a live record without dropping it (see Counters::rebase): if it is still of
-- epoch ARGV[1], it becomes epoch ARGV[4] with base ARGV[2] (the document's usage) and
-- carries what it holds above ARGV[3] (the document's watermark of ARGV[1], read with it),
-- never below 0 (the document stops at 0 when refunds pass it, and its watermark does not),
-- nor below a base another writer left below 0 (storage::usage_after_write, as the document).
-- ARGV[5] the outdated mark (see RebaseMark): '1' set (another replica decides in
-- Firestore these moments), '0' cleared (the record was read marked, before the document),
-- '' left as it is (read unmarked: a mark there now came after the document was read)
-- KEYS[1] record hash; KEYS[2..] idempotency keys the ledger recorded, with ARGV[6..] their
-- answers and expiry (pairs: 'amount:allowed:used:limit', unix ms), set unless present
-- Returns 1 when rebased, 0 when the record is gone or of another epoch.
local v = redis.call('HMGET', KEYS[1], 'epoch', 'used', 'ver', 'synced')
if v[1] ~= ARGV[1] then return 0 end
local carried = tonumber(v[2]) - tonumber(ARGV[3])
local dirty = tonumber(v[3]) > tonumber(v[4])
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'epoch', ARGV[4], 'base', ARGV[2],
  'used', string.format('%d', math.max(math.min(tonumber(ARGV[2]), 0), tonumber(ARGV[2]) + carried)), 'from', ARGV[1],
  'ver', dirty and '1' or '0', 'synced', '0', 'fromw', ARGV[3],
  'at', string.format('%d', t[1] * 1000 + math.floor(t[2] / 1000))) -- loaded now (see load.lua)
if ARGV[5] == '1' then
  redis.call('HSET', KEYS[1], 'outdated', '1')
elseif ARGV[5] == '0' then
  redis.call('HDEL', KEYS[1], 'outdated') -- it holds what the document holds now
end
for i = 2, #KEYS do
  redis.call('SET', KEYS[i], ARGV[2 * i + 2], 'PXAT', ARGV[2 * i + 3], 'NX')
end
return 1
