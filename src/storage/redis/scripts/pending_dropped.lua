-- Prepended to forget.lua and load.lua. Marks the provider's pending idempotency records
-- (hash: id -> 'amount:allowed:used:limit:expiresMs') as decided by a record whose usage
-- never reaches the ledger: one dropped as stale, or replaced by an operator's `used`.
-- They still go to the ledger with the next record's write, so that a retry Firestore
-- decides is answered, not charged; but marked ('...:dropped', an epoch no document has),
-- so that the ledger never settles them against the fallback's answer of the same key
-- (settle_twice_decided): their usage is not in the document to take out.
-- A key of another type is left alone: the script's other writes have run.
local function mark_pending_dropped(pending)
  if redis.call('TYPE', pending)['ok'] ~= 'hash' then return end
  local entries = redis.call('HGETALL', pending)
  for i = 1, #entries, 2 do
    local entry = entries[i + 1]
    if select(2, string.gsub(entry, ':', '')) == 4 then
      redis.call('HSET', pending, entries[i], entry .. ':dropped')
    end
  end
end
