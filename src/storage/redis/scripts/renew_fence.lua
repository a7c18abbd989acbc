-- Renews a fence its holder still holds (see fence.lua): it now expires after the TTL.
-- KEYS[1] fences (sorted set: token -> expiry ms); ARGV[1] token, ARGV[2] TTL ms
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZADD', KEYS[1], string.format('%d', now + tonumber(ARGV[2])), ARGV[1])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], last[2])
return 1
