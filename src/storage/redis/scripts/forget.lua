-- Drop a record of a given epoch, dirty or not (its document moved to another epoch), and
-- mark the idempotency records it had not written (mark_pending_dropped).
-- KEYS[1] record hash, KEYS[2] dirty index, KEYS[3] the provider's pending idempotency
-- records; ARGV[1] epoch, ARGV[2] provider id
-- Returns 1 when it dropped the record, 0 when there was none of that epoch.
if redis.call('HGET', KEYS[1], 'epoch') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[2])
  mark_pending_dropped(KEYS[3])
  return 1
end
return 0
