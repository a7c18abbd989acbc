-- The batch sync's lock: one holder at a time, expiring if the holder dies.
-- KEYS[1] lock key (value: the holder's token)
-- ARGV[1] 'acquire' | 'renew' | 'release', ARGV[2] token, ARGV[3] TTL ms, ARGV[4] deadline in
--         Redis ms ('0': none): an acquire or renew run later changes nothing, because its
--         sender has stopped waiting (a hung Redis runs the calls it queued when it resumes:
--         an acquire then would hold the lock for a holder that never knew it had it)
-- Returns 1 when `token` holds the lock afterwards (release: 1 when it was released), else 0.
if ARGV[1] ~= 'release' and ARGV[4] ~= '0' then
  local t = redis.call('TIME')
  if t[1] * 1000 + math.floor(t[2] / 1000) > tonumber(ARGV[4]) then return 0 end
end
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
