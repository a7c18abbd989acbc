-- Marks a record outdated (see Counters::mark_outdated): Firestore may have decided for its
-- provider since it was loaded. apply answers 'outdated' for it and changes nothing; a load
-- (which replaces the hash) or a rebase clears the mark, unless it writes the record outdated
-- itself (Seed::outdated), or the rebase read the record before the mark (RebaseMark).
-- KEYS[1] record hash
-- Returns 1 when marked, 0 when there is no record (as apply.lua's late path: a key of
-- another type is left alone).
if redis.call('TYPE', KEYS[1])['ok'] ~= 'hash' then return 0 end
redis.call('HSET', KEYS[1], 'outdated', '1')
return 1
