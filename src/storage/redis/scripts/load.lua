-- Create a record from the ledger unless one exists (another replica may have won the race).
-- KEYS[1] record hash, KEYS[2] dirty index, KEYS[3] fences (sorted set: token -> expiry
-- ms), KEYS[4] fence generation, KEYS[5] the provider's pending idempotency records
-- ARGV[1] used, ARGV[2] limit, ARGV[3] epoch, ARGV[4] loaded-from epoch, ARGV[5] TTL seconds,
-- ARGV[6] '1' to replace an existing record (an operator set the quota: the replaced
-- record's pending idempotency records are marked, see mark_pending_dropped), ARGV[7]
-- provider id, ARGV[8] the fence generation read before the document, ARGV[9] '1' when
-- the record is written outdated (see Seed::outdated; a record left in place is marked
-- too); KEYS[6..] idempotency keys the ledger recorded, with ARGV[10..] their answers and
-- expiry (pairs: 'amount:allowed:used:limit', unix ms), set unless present
-- The record keeps its load time ('at', Redis ms): mark_synced gives a record that turns
-- clean the cache TTL from then.
-- Returns 1 when it wrote the record, 0 when one was there, 2 when it was refused: a fence
-- is held (Firestore is deciding for the provider) or was taken since the document was
-- read, so the document may miss a decision. A refused replacement drops the record (the
-- next request loads it).
local function kept()
  if ARGV[9] == '1' and redis.call('TYPE', KEYS[1])['ok'] == 'hash' then
    redis.call('HSET', KEYS[1], 'outdated', '1')
  end
  return 0
end
if ARGV[6] ~= '1' and redis.call('EXISTS', KEYS[1]) == 1 then return kept() end
-- a record loaded from the operator's document (another replica's, between the document's
-- write and this call) starts from the operator's `used` already and holds only later
-- decisions: it stays, and its idempotency records are not marked
if ARGV[6] == '1' and ARGV[4] ~= '' and redis.call('HGET', KEYS[1], 'from') == ARGV[4] then return kept() end
-- a replacement drops the record it replaces, or the record is dropped when refused below
if ARGV[6] == '1' then mark_pending_dropped(KEYS[5]) end
local t = redis.call('TIME')
local now_s = string.format('%d', t[1] * 1000 + math.floor(t[2] / 1000))
if redis.call('ZCOUNT', KEYS[3], '(' .. now_s, '+inf') > 0
    or (redis.call('GET', KEYS[4]) or '0') ~= ARGV[8] then
  if ARGV[6] == '1' then
    redis.call('DEL', KEYS[1])
    redis.call('ZREM', KEYS[2], ARGV[7])
  end
  return 2
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'used', ARGV[1], 'limit', ARGV[2], 'epoch', ARGV[3], 'base', ARGV[1],
  'from', ARGV[4], 'ver', '0', 'synced', '0', 'at', now_s)
if ARGV[9] == '1' then redis.call('HSET', KEYS[1], 'outdated', '1') end
redis.call('EXPIRE', KEYS[1], ARGV[5])
if ARGV[6] == '1' then redis.call('ZREM', KEYS[2], ARGV[7]) end
for i = 6, #KEYS do
  local answer, expires = ARGV[2 * i - 2], ARGV[2 * i - 1]
  redis.call('SET', KEYS[i], answer, 'PXAT', expires, 'NX')
end
return 1
