-- Consumes and refunds, each atomically with its idempotency record, in one call: the
-- changes that concurrent requests made ready together (one or more) are decided in order,
-- exactly as if each had been its own call.
-- KEYS[1] dirty index (sorted set; the one key outside the providers' slots: on Redis
--         Cluster it would be sharded by slot, and a call would carry one provider only)
-- KEYS[2] the sender's receipts (hash: slot -> receipt; outside the slots too)
-- per item (n identical changes in a row without idempotency keys, as a hot provider's
--         changes of one call are, or one change), in order: its record hash; then, only
--         when it carries an idempotency key, that key and the provider's idempotency
--         records not yet in the ledger (hash: id -> entry with expiry ms)
-- ARGV[1] deadline in Redis ms ('0': none): a call run later changes no usage (its sender
--         has stopped waiting and decided from Firestore instead); it marks its records
--         outdated (below)
-- ARGV[2] idempotency TTL seconds
-- ARGV[3] the receipt's slot in KEYS[2] ('': no receipt), ARGV[4] the call's sequence number
-- per item, from ARGV[a] (a = 5 for the first, then a + 6): ARGV[a] n (1 with an
--         idempotency key), ARGV[a + 1] 'c' consume | 'r' refund, ARGV[a + 2] amount,
--         ARGV[a + 3] flags: 1 when the idempotency key is used, plus 2 when the item's
--         last change answers with the record (below), ARGV[a + 4] provider id (member
--         of the dirty index), ARGV[a + 5] the key's id (field of the hash)
-- A keyed decision makes the record dirty even when usage is unchanged: the key travels to
-- the ledger with the next write, so a retry that Firestore decides is answered too.
-- A record is dirty exactly when ver > synced, and every dirty record is persistent (load,
-- mark_synced, forget and evict_clean keep this), so only a call that makes a clean record
-- dirty pays for PERSIST.
-- A record is read once per call and written once at its end, however many of the call's
-- changes it takes (one hot provider: the usual case under load). Nothing outside the script
-- sees the difference: it runs atomically.
-- Each item runs under pcall: Redis does not undo a script's writes when it stops on an
-- error, so one change failing (a key of the wrong type, a record missing a field) must not
-- fail the changes before it, nor those after it. (A change without a key fails only on its
-- record's first read, so an item's later changes would fail alike.) A change writes its idempotency records
-- itself, in order, before it changes the record's state in the call, and everything that
-- can fail comes before that: a change answered 'err' has changed nothing. The writes at the
-- end cannot fail (the dirty index's type is checked first; each record was read as a hash).
-- A call run after its deadline changes no usage and marks every record it names outdated
-- (see mark_outdated.lua): its sender has decided from Firestore instead, and Redis runs it
-- only now because Redis hung meanwhile. Other replicas, which may reach Redis again before
-- the sender's reconciliation has reloaded the records, must not decide from them.
-- A change of an outdated record is answered 'outdated' and changes nothing.
-- A call that changed usage without idempotency keys leaves a receipt: '<seq>' and then, per
-- provider, '<provider> <usage it added> <the record epoch's first 8 characters>'
-- (space-separated; ids and epochs have no spaces), in the
-- sender's hash at its slot (the sender's calls take the slots in turn). A sender whose call
-- went unanswered (Redis stopped after running it, or the connection dropped) decides from
-- Firestore meanwhile, and reads the receipt once Redis answers to take the usage back out
-- (settle_receipt.lua): the change counts once. A keyed change needs none: its idempotency
-- record settles it (the ledger's settle_twice_decided). The receipt is written with
-- redis.pcall: a broken hash loses it, and never fails the call.
-- Returns {'late'}, or four values per change: 'miss' | 'outdated' | 'reused' | 'replay' |
-- 'ok' | 'err', then allowed 0/1, used, limit (zeros after 'miss', 'outdated' and 'reused';
-- the error after 'err'). With flag 2, the last change of an item answers 'ok <ver> <base> <fromw | -> <epoch>
-- <from>' instead of 'ok' while the record holds changes not yet in the ledger: with used and
-- limit, the record as the item left it, which its sender can write to the ledger if Redis
-- loses it (or stops answering) before the writer has read it.
local function s(n) return string.format('%d', n) end
local t = redis.call('TIME')
local now_ms = t[1] * 1000 + math.floor(t[2] / 1000)
if ARGV[1] ~= '0' and now_ms > tonumber(ARGV[1]) then
  local k = 3
  for a = 5, #ARGV, 6 do
    if redis.call('TYPE', KEYS[k])['ok'] == 'hash' then redis.call('HSET', KEYS[k], 'outdated', '1') end
    k = k + (tonumber(ARGV[a + 3]) % 2 == 1 and 3 or 1)
  end
  return {'late'}
end
local now_s = s(now_ms)
local ttl = ARGV[2]
local ttl_ms_s = s(tonumber(ttl) * 1000)
local expires_s = s(now_ms + tonumber(ttl) * 1000)

-- the dirty index must be a sorted set (or absent): otherwise no change can be recorded
local index_type = redis.call('TYPE', KEYS[1])['ok']
if index_type ~= 'zset' and index_type ~= 'none' then
  local out, message = {}, 'the dirty index ' .. KEYS[1] .. ' is a ' .. index_type
  for a = 5, #ARGV, 6 do
    for _ = 1, tonumber(ARGV[a]) do
      out[#out + 1], out[#out + 2], out[#out + 3], out[#out + 4] = 'err', message, 0, 0
    end
  end
  return out
end

-- record key -> its state as this call has left it: used, limit, ver, the ver and synced it
-- was read with, its provider, and whether it is queued to be written
local records = {}
local written = {} -- the records to write back, in the order first changed

local function change(record, idem, pending, op, amount_s, provider, id)
  local amount = tonumber(amount_s)
  if idem then
    local prior = redis.call('GET', idem)
    if prior then
      local first, allowed, used, limit = string.match(prior, '^(%d+):(%d):(%d+):(%d+)$')
      if first ~= amount_s then return 'reused', 0, 0, 0 end
      return 'replay', tonumber(allowed), tonumber(used), tonumber(limit)
    end
  end
  local r = records[record]
  if not r then
    local v = redis.call('HMGET', record, 'used', 'limit', 'ver', 'synced', 'outdated', 'epoch')
    if not v[1] then return 'miss', 0, 0, 0 end
    if v[5] then return 'outdated', 0, 0, 0 end -- read again by each change: it stays outdated
    local used, limit, ver = tonumber(v[1]), tonumber(v[2]), tonumber(v[3])
    if not (used and limit and ver) then error('ERR the record ' .. record .. ' is incomplete') end
    r = {used = used, limit = limit, ver = ver, read_ver = ver, synced = tonumber(v[4]), provider = provider,
      receipt_epoch = v[6] and string.sub(v[6], 1, 8) or '-'}
    records[record] = r
  end
  local used = r.used
  local allowed, new_used = 1, used
  if op == 'c' then
    if used + amount > r.limit then allowed = 0 else new_used = used + amount end
  else
    new_used = math.max(math.min(used, 0), used - amount) -- see storage::decide
  end
  if idem then
    local answer = amount_s .. ':' .. allowed .. ':' .. s(new_used) .. ':' .. s(r.limit)
    redis.call('HSET', pending, id, answer .. ':' .. expires_s) -- the one write that can fail
    redis.call('PEXPIRE', pending, ttl_ms_s)
    redis.call('SET', idem, answer, 'EX', ttl)
  end
  if new_used ~= used and not idem then r.plain = (r.plain or 0) + new_used - used end
  if new_used ~= used or idem then
    if not r.queued then
      r.queued = true
      written[#written + 1] = record
    end
    r.used, r.ver = new_used, r.ver + 1
  end
  return 'ok', allowed, new_used, r.limit
end

local out = {}
local function answer(status, allowed, used, limit)
  local n = #out
  out[n + 1], out[n + 2], out[n + 3], out[n + 4] = status, allowed, used, limit
end

-- decides one item: `n` identical changes in a row, each answered as if sent alone
local function run(n, record, idem, pending, op, amount_s, provider, id, with_record)
  -- the record's lineage, read once per call and only when asked for (the hot path reads 6
  -- fields), and before any change: a record it cannot read fails the item unchanged
  local lineage = with_record and records[record]
  if with_record and not (lineage and lineage.epoch) then
    local v = redis.call('HMGET', record, 'epoch', 'base', 'from', 'fromw')
    lineage = nil
    if v[1] or v[2] then
      if not (v[1] and tonumber(v[2])) then error('ERR the record ' .. record .. ' is incomplete') end
      lineage = {epoch = v[1], base = tonumber(v[2]), from = v[3] or '', fromw = v[4]}
    end
  end
  for _ = 1, n do answer(change(record, idem, pending, op, amount_s, provider, id)) end
  local r, last = records[record], #out - 3
  if lineage and r and out[last] == 'ok' and r.ver > (r.synced or 0) then
    r.epoch, r.base, r.from, r.fromw = lineage.epoch, lineage.base, lineage.from, lineage.fromw
    out[last] = 'ok ' .. s(r.ver) .. ' ' .. s(r.base) .. ' ' .. (r.fromw or '-') .. ' ' .. r.epoch .. ' ' .. r.from
  end
end

local k = 3
for a = 5, #ARGV, 6 do
  local n = tonumber(ARGV[a])
  local record, idem, pending = KEYS[k], nil, nil
  local flags = tonumber(ARGV[a + 3])
  if flags % 2 == 1 then
    idem, pending = KEYS[k + 1], KEYS[k + 2]
    k = k + 3
  else
    k = k + 1
  end
  local answered = #out
  local ok, err = pcall(run, n, record, idem, pending, ARGV[a + 1], ARGV[a + 2], ARGV[a + 4], ARGV[a + 5],
    flags >= 2)
  if not ok then -- this change failed, and the item's rest with it
    if type(err) == 'table' then err = err.err end
    for _ = (#out - answered) / 4 + 1, n do answer('err', tostring(err), 0, 0) end
  end
end

if #written > 0 then
  -- every time, not only when a record turns dirty: an index lost to an operator's DEL (or
  -- an eviction policy that takes keys without a TTL) is repaired by the next change
  local indexed = {}
  for _, record in ipairs(written) do
    indexed[#indexed + 1] = now_s
    indexed[#indexed + 1] = records[record].provider
  end
  redis.call('ZADD', KEYS[1], 'NX', unpack(indexed))
  for _, record in ipairs(written) do
    local r = records[record]
    redis.call('HSET', record, 'used', s(r.used), 'ver', s(r.ver))
    if not r.synced or r.read_ver <= r.synced then redis.call('PERSIST', record) end
  end
  if ARGV[3] ~= '' then
    local receipt = {ARGV[4]}
    for _, record in ipairs(written) do
      local r = records[record]
      if r.plain and r.plain ~= 0 then
        receipt[#receipt + 1] = r.provider
        receipt[#receipt + 1] = s(r.plain)
        receipt[#receipt + 1] = r.receipt_epoch
      end
    end
    if #receipt > 1 then
      -- the hash lives an hour from its sender's last call of each 64 (or its first)
      local added = redis.pcall('HSET', KEYS[2], ARGV[3], table.concat(receipt, ' '))
      if added == 1 or tonumber(ARGV[4]) % 64 == 0 then redis.pcall('PEXPIRE', KEYS[2], 3600000) end
    end
  end
end
return out
