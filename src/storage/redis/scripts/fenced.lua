-- Whether a fence is held on a provider (see fence.lua).
-- KEYS[1] fences (sorted set: token -> expiry ms)
-- Returns the number of fences held.
local t = redis.call('TIME')
local now_s = string.format('%d', t[1] * 1000 + math.floor(t[2] / 1000))
return redis.call('ZCOUNT', KEYS[1], '(' .. now_s, '+inf')
