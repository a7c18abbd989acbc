-- Marks a record outdated (see Counters::mark_outdated): Firestore may have decided for its
-- provider since it was loaded. apply answers 'outdated' for it and changes nothing; a load
-- (which replaces the hash) or a rebase clears the mark.
-- KEYS[1] record hash
-- Returns 1 when marked, 0 when there is no record.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'outdated', '1')
return 1
