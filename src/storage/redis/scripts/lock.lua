-- The batch sync's lock: one holder at a time, expiring if the holder dies.
-- KEYS[1] lock key (value: the holder's token)
-- ARGV[1] 'acquire' | 'renew' | 'release', ARGV[2] token, ARGV[3] TTL ms
-- Returns 1 when `token` holds the lock afterwards (release: 1 when it was released), else 0.
local holder = redis.call('GET', KEYS[1])
if ARGV[1] == 'acquire' then
  if holder then return 0 end
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
if holder ~= ARGV[2] then return 0 end
if ARGV[1] == 'renew' then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
else
  redis.call('DEL', KEYS[1])
end
return 1
