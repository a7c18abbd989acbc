-- Set the limit of a cached record, if there is one.
-- KEYS[1] record hash; ARGV[1] limit
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'limit', ARGV[1]) end
return 1
