-- Drop a record of a given epoch, dirty or not (its document moved to another epoch).
-- KEYS[1] record hash, KEYS[2] dirty index; ARGV[1] epoch, ARGV[2] provider id
if redis.call('HGET', KEYS[1], 'epoch') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[2])
end
return 1
