-- Create a record from the ledger unless one exists (another replica may have won the race).
-- KEYS[1] record hash
-- ARGV[1] used, ARGV[2] limit, ARGV[3] epoch, ARGV[4] loaded-from epoch, ARGV[5] TTL seconds,
-- ARGV[6] '1' to replace an existing record (an operator set the quota), KEYS[2] dirty index,
-- ARGV[7] provider id; KEYS[3..] idempotency keys the ledger recorded, with ARGV[8..] their
-- answers and expiry (pairs: 'amount:allowed:used:limit', unix ms), set unless present
-- Returns 1 when it wrote the record, 0 when one was there.
if ARGV[6] ~= '1' and redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'used', ARGV[1], 'limit', ARGV[2], 'epoch', ARGV[3], 'base', ARGV[1],
  'from', ARGV[4], 'ver', '0', 'synced', '0')
redis.call('EXPIRE', KEYS[1], ARGV[5])
if ARGV[6] == '1' then redis.call('ZREM', KEYS[2], ARGV[7]) end
for i = 3, #KEYS do
  local answer, expires = ARGV[2 * i + 2], ARGV[2 * i + 3]
  redis.call('SET', KEYS[i], answer, 'PXAT', expires, 'NX')
end
return 1
