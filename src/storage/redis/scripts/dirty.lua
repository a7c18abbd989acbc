-- Providers dirty for at least ARGV[1] ms (by Redis time), oldest first, at most ARGV[2].
-- KEYS[1] dirty index
local t = redis.call('TIME')
local cutoff = t[1] * 1000 + math.floor(t[2] / 1000) - tonumber(ARGV[1])
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', cutoff), 'LIMIT', 0, tonumber(ARGV[2]))
