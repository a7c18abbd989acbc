-- Takes a fence on a provider while Firestore decides for it (no record loads until it is
-- released, or expires if its holder died), then drops the record unless it is dirty; or,
-- for a fallback (ARGV[3] 'outdated'), marks the record outdated and keeps it.
-- KEYS[1] record hash, KEYS[2] fences (sorted set: token -> expiry ms), KEYS[3] fence
-- generation; ARGV[1] token, ARGV[2] TTL ms, ARGV[3] 'outdated' | ''
-- Returns 1 when the record is gone (or marked), 0 when it is dirty (kept: flush it, then
-- evict it).
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', string.format('%d', now))
redis.call('ZADD', KEYS[2], string.format('%d', now + tonumber(ARGV[2])), ARGV[1])
local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[2], last[2]) -- the set lives as long as its last fence
redis.call('INCR', KEYS[3])
redis.call('PEXPIRE', KEYS[3], 86400000) -- far longer than any load takes
if ARGV[3] == 'outdated' then -- as mark_outdated.lua
  if redis.call('TYPE', KEYS[1])['ok'] == 'hash' then redis.call('HSET', KEYS[1], 'outdated', '1') end
  return 1
end
local v = redis.call('HMGET', KEYS[1], 'ver', 'synced')
if v[1] and tonumber(v[1]) > tonumber(v[2]) then return 0 end
redis.call('DEL', KEYS[1])
return 1
