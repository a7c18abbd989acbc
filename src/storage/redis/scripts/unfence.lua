-- Releases a fence (see fence.lua); bumps the generation, so that a load of a document read
-- before the fenced decision landed is refused.
-- KEYS[1] fences, KEYS[2] fence generation; ARGV[1] token
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], 86400000)
return 1
