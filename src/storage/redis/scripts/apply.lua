-- Consumes and refunds, each atomically with its idempotency record, in one call: the
-- changes that concurrent requests made ready together (one or more) are decided in order,
-- exactly as if each had been its own call.
-- KEYS[1] dirty index (sorted set; the one key outside the providers' slots: on Redis
--         Cluster it would be sharded by slot, and a call would carry one provider only)
-- per change, in order: its record hash; then, only when it carries an idempotency key,
--         that key and the provider's idempotency records not yet in the ledger (hash:
--         id -> entry with expiry ms)
-- ARGV[1] deadline in Redis ms ('0': none): a call run later changes nothing, because its
--         sender has stopped waiting and decided from Firestore instead
-- ARGV[2] idempotency TTL seconds
-- per change i: ARGV[3 + 5i] 'c' consume | 'r' refund, ARGV[4 + 5i] amount,
--         ARGV[5 + 5i] '1' when the idempotency key is used, ARGV[6 + 5i] provider id
--         (member of the dirty index), ARGV[7 + 5i] the key's id (field of the hash)
-- A keyed decision makes the record dirty even when usage is unchanged: the key travels to
-- the ledger with the next write, so a retry that Firestore decides is answered too.
-- A record is dirty exactly when ver > synced, and every dirty record is persistent (load,
-- mark_synced, forget and evict_clean keep this), so only a call that makes a clean record
-- dirty pays for PERSIST.
-- A record is read once per call and written once at its end, with the idempotency records
-- of its keyed changes, however many of the call's changes it takes (one hot provider: the
-- usual case under load); a key retried within the call is answered from the call's own
-- record of it. Nothing outside the script sees the difference: it runs atomically.
-- Each change runs under pcall: Redis does not undo a script's writes when it stops on an
-- error, so one change failing (a key of the wrong type) must not fail the changes before
-- it, which are applied, nor those after it. The writes at the end are ordered so that
-- the only ones that can fail (keys of the wrong type: the dirty index, a pending hash) come
-- first: a change answered 'err' has changed nothing.
-- Returns {'late'}, or four values per change: 'miss' | 'reused' | 'replay' | 'ok' | 'err',
-- then allowed 0/1, used, limit (zeros after 'miss' and 'reused'; the error after 'err').
local function s(n) return string.format('%d', n) end
local t = redis.call('TIME')
local now_ms = t[1] * 1000 + math.floor(t[2] / 1000)
if ARGV[1] ~= '0' and now_ms > tonumber(ARGV[1]) then return {'late'} end
local now_s = s(now_ms)
local ttl = ARGV[2]
local ttl_ms_s = s(tonumber(ttl) * 1000)
local expires_s = s(now_ms + tonumber(ttl) * 1000)

-- record key -> its state as this call has left it: used, limit, ver, the ver and synced it
-- was read with, its provider, and its keyed changes' idempotency records (created lazily)
local records = {}
local written = {} -- the records to write back, in the order first changed
local answers = {} -- idempotency key -> the answer a change of this call recorded for it
local read = {} -- change number -> the record it read: its answer fails if that write fails

local function change(n, record, idem, pending, op, amount_s, provider, id)
  local amount = tonumber(amount_s)
  if idem then
    local prior = answers[idem]
    if prior then
      read[n] = record -- answered from a change of this call: it fails if that one's write does
    else
      prior = redis.call('GET', idem)
    end
    if prior then
      local first, allowed, used, limit = string.match(prior, '^(%d+):(%d):(%d+):(%d+)$')
      if first ~= amount_s then return 'reused', 0, 0, 0 end
      return 'replay', tonumber(allowed), tonumber(used), tonumber(limit)
    end
  end
  local r = records[record]
  if not r then
    local v = redis.call('HMGET', record, 'used', 'limit', 'ver', 'synced')
    if not v[1] then return 'miss', 0, 0, 0 end
    local ver = tonumber(v[3])
    r = {used = tonumber(v[1]), limit = tonumber(v[2]), ver = ver, read_ver = ver,
      synced = tonumber(v[4]), provider = provider}
    records[record] = r
  end
  read[n] = record
  local used = r.used
  local allowed, new_used = 1, used
  if op == 'c' then
    if used + amount > r.limit then allowed = 0 else new_used = used + amount end
  else
    new_used = math.max(0, used - amount)
  end
  if new_used ~= used or idem then
    if r.ver == r.read_ver then written[#written + 1] = record end
    r.used, r.ver = new_used, r.ver + 1
  end
  if idem then
    local answer = amount_s .. ':' .. allowed .. ':' .. s(new_used) .. ':' .. s(r.limit)
    answers[idem] = answer
    if not r.keyed then r.keyed = {} end
    r.keyed[#r.keyed + 1] = {idem, pending, id, answer}
  end
  return 'ok', allowed, new_used, r.limit
end

-- the idempotency records of the record's keyed changes, then its final state; only the
-- first command can fail (a pending hash of the wrong type), and then nothing is written
local function write(record, r)
  if r.keyed then
    for _, kd in ipairs(r.keyed) do
      redis.call('HSET', kd[2], kd[3], kd[4] .. ':' .. expires_s)
      redis.call('PEXPIRE', kd[2], ttl_ms_s)
      redis.call('SET', kd[1], kd[4], 'EX', ttl)
    end
  end
  redis.call('HSET', record, 'used', s(r.used), 'ver', s(r.ver))
  if not r.synced or r.read_ver <= r.synced then redis.call('PERSIST', record) end
end

local function message(err)
  if type(err) == 'table' then err = err.err end
  return tostring(err)
end

local out = {}
local k = 2
for i = 0, (#ARGV - 2) / 5 - 1 do
  local a = 3 + 5 * i
  local record, idem, pending = KEYS[k], nil, nil
  if ARGV[a + 2] == '1' then
    idem, pending = KEYS[k + 1], KEYS[k + 2]
    k = k + 3
  else
    k = k + 1
  end
  local ok, status, allowed, used, limit =
    pcall(change, i, record, idem, pending, ARGV[a], ARGV[a + 1], ARGV[a + 3], ARGV[a + 4])
  if not ok then status, allowed, used, limit = 'err', message(status), 0, 0 end
  out[4 * i + 1], out[4 * i + 2], out[4 * i + 3], out[4 * i + 4] = status, allowed, used, limit
end

if #written > 0 then
  local failed = {}
  -- the dirty index first, for every record to write, so that a record is never dirty
  -- outside it; every time, not only when a record turns dirty: an index lost to an
  -- operator's DEL (or an eviction policy that takes keys without a TTL) is repaired by the
  -- next change. If it fails (a key of the wrong type), no record is written.
  local indexed = {}
  for _, record in ipairs(written) do
    indexed[#indexed + 1] = now_s
    indexed[#indexed + 1] = records[record].provider
  end
  local ok, err = pcall(redis.call, 'ZADD', KEYS[1], 'NX', unpack(indexed))
  for _, record in ipairs(written) do
    if ok then
      local done, why = pcall(write, record, records[record])
      if not done then failed[record] = message(why) end
    else
      failed[record] = message(err)
    end
  end
  if next(failed) then
    for i, record in pairs(read) do
      local why = failed[record]
      if why then out[4 * i + 1], out[4 * i + 2], out[4 * i + 3], out[4 * i + 4] = 'err', why, 0, 0 end
    end
  end
end
return out
