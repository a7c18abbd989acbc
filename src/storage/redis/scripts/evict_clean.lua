-- Drop a record unless it holds usage the ledger has not seen.
-- KEYS[1] record hash
-- Returns 1 when the record is gone, 0 when it is dirty (and kept).
local v = redis.call('HMGET', KEYS[1], 'ver', 'synced')
if v[1] and tonumber(v[1]) > tonumber(v[2]) then return 0 end
redis.call('DEL', KEYS[1])
return 1
