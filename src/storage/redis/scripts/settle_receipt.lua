-- Takes back the usage an unanswered call added to one provider (see apply.lua's receipts):
-- its sender decided the call's changes from Firestore too, so they would count twice.
-- KEYS[1] the sender's receipts (hash), KEYS[2] the provider's record, KEYS[3] dirty index
-- ARGV[1] the receipt's slot, ARGV[2] the call's sequence number, ARGV[3] provider id,
-- ARGV[4] 'settle' | 'forget'
-- The receipt names, per provider, the usage the call added and the record's epoch then.
-- 'settle': when the receipt still names the provider and its record is cached in that
-- epoch's lineage (the epoch itself, or one loaded or rebased from it), takes the usage back
-- out of the record as a change of its own (a new version, dirty, so the writer takes it to
-- the document like any change: the record's usage, written or not, holds the call's), and
-- forgets the provider's part of the receipt: 'record <usage>'. A record of another lineage
-- (an operator set `used` since: the call's usage is gone with the old epoch) is left as it
-- is and the part forgotten: 'lost <usage>'. Without a record the call's usage has reached
-- the document (a record is dropped only once written), and the part is kept: 'ledger
-- <usage> <epoch>', for the sender to take it out there (while the document is still in that
-- epoch) and then 'forget' it: 'forgotten'.
-- Returns 'gone' when the receipt no longer names the provider (settled already, or taken
-- over by a later call: the sender's calls take the slots in turn). Everything that can fail
-- comes before the first write.
local index_type = redis.call('TYPE', KEYS[3])['ok']
if index_type ~= 'zset' and index_type ~= 'none' then
  return redis.error_reply('ERR the dirty index ' .. KEYS[3] .. ' is a ' .. index_type)
end
local entry = redis.call('HGET', KEYS[1], ARGV[1])
if not entry then return 'gone' end
local parts = {}
for part in string.gmatch(entry, '%S+') do parts[#parts + 1] = part end
if parts[1] ~= ARGV[2] then return 'gone' end
local at
for i = 2, #parts - 2, 3 do
  if parts[i] == ARGV[3] then at = i end
end
if not at then return 'gone' end
local added, epoch = tonumber(parts[at + 1]), parts[at + 2]

local function forget()
  for _ = 1, 3 do table.remove(parts, at) end
  if #parts > 1 then
    redis.call('HSET', KEYS[1], ARGV[1], table.concat(parts, ' '))
  else
    redis.call('HDEL', KEYS[1], ARGV[1])
  end
end

if ARGV[4] == 'forget' then
  forget()
  return 'forgotten'
end
local v = redis.call('HMGET', KEYS[2], 'used', 'ver', 'epoch', 'from')
local used, ver = tonumber(v[1]), tonumber(v[2])
if not (used and ver) then return 'ledger ' .. string.format('%d', added) .. ' ' .. epoch end
-- (epochs are random: 8 hex characters tell them apart)
if string.sub(v[3] or '', 1, 8) ~= epoch and string.sub(v[4] or '', 1, 8) ~= epoch then
  forget()
  return 'lost ' .. string.format('%d', added)
end
forget()
redis.call('HSET', KEYS[2], 'used', string.format('%d', math.max(math.min(used, 0), used - added)),
  'ver', string.format('%d', ver + 1))
-- dirty now, so persistent and indexed as apply.lua leaves a changed record
redis.call('PERSIST', KEYS[2])
local t = redis.call('TIME')
redis.call('ZADD', KEYS[3], 'NX', string.format('%d', t[1] * 1000 + math.floor(t[2] / 1000)), ARGV[3])
return 'record ' .. string.format('%d', added)
