-- Consumes and refunds, each atomically with its idempotency record, in one call: the
-- changes that concurrent requests made ready together (one or more) are decided in order,
-- exactly as if each had been its own call.
-- KEYS[1] dirty index (sorted set; the one key outside the providers' slots: on Redis
--         Cluster it would be sharded by slot, and a call would carry one provider only)
-- per change i = 0, 1, ...: KEYS[2 + 3i] record hash, KEYS[3 + 3i] idempotency key,
--         KEYS[4 + 3i] idempotency records not yet in the ledger (hash: id -> entry with
--         expiry ms)
-- ARGV[1] deadline in Redis ms ('0': none): a call run later changes nothing, because its
--         sender has stopped waiting and decided from Firestore instead
-- ARGV[2] idempotency TTL seconds
-- per change i: ARGV[3 + 5i] 'c' consume | 'r' refund, ARGV[4 + 5i] amount,
--         ARGV[5 + 5i] '1' when the idempotency key is used, ARGV[6 + 5i] provider id
--         (member of the dirty index), ARGV[7 + 5i] the key's id (field of the hash)
-- A keyed decision makes the record dirty even when usage is unchanged: the key travels to
-- the ledger with the next write, so a retry that Firestore decides is answered too.
-- A record is dirty exactly when ver > synced, and every dirty record is persistent (load,
-- mark_synced, forget and evict_clean keep this), so only the change that makes a clean
-- record dirty pays for PERSIST.
-- Each change runs under pcall: Redis does not undo a script's writes when it stops on an
-- error, so one change failing (a key of the wrong type) must not fail the changes before
-- it, which are applied, nor those after it.
-- Returns {'late'}, or four values per change: 'miss' | 'reused' | 'replay' | 'ok' | 'err',
-- then allowed 0/1, used, limit (zeros after 'miss' and 'reused'; the error after 'err').
local function s(n) return string.format('%d', n) end
local t = redis.call('TIME')
local now_ms = t[1] * 1000 + math.floor(t[2] / 1000)
if ARGV[1] ~= '0' and now_ms > tonumber(ARGV[1]) then return {'late'} end
local ttl = ARGV[2]

local function change(record, idem, pending, op, amount_s, keyed, provider, id)
  local amount = tonumber(amount_s)
  if keyed then
    local prior = redis.call('GET', idem)
    if prior then
      local first, allowed, used, limit = string.match(prior, '^(%d+):(%d):(%d+):(%d+)$')
      if first ~= amount_s then return 'reused', 0, 0, 0 end
      return 'replay', tonumber(allowed), tonumber(used), tonumber(limit)
    end
  end
  local v = redis.call('HMGET', record, 'used', 'limit', 'ver', 'synced')
  if not v[1] then return 'miss', 0, 0, 0 end
  local used, limit, ver = tonumber(v[1]), tonumber(v[2]), tonumber(v[3])
  local allowed, new_used = 1, used
  if op == 'c' then
    if used + amount > limit then allowed = 0 else new_used = used + amount end
  else
    new_used = math.max(0, used - amount)
  end
  if new_used ~= used or keyed then
    redis.call('HSET', record, 'used', s(new_used), 'ver', s(ver + 1))
    local synced = tonumber(v[4])
    if not synced or ver <= synced then redis.call('PERSIST', record) end
    -- every time, not only when the record turns dirty: an index lost to an operator's DEL
    -- (or an eviction policy that takes keys without a TTL) is repaired by the next change
    redis.call('ZADD', KEYS[1], 'NX', s(now_ms), provider)
  end
  if keyed then
    local answer = amount_s .. ':' .. allowed .. ':' .. s(new_used) .. ':' .. s(limit)
    redis.call('SET', idem, answer, 'EX', ttl)
    redis.call('HSET', pending, id, answer .. ':' .. s(now_ms + tonumber(ttl) * 1000))
    redis.call('PEXPIRE', pending, s(tonumber(ttl) * 1000))
  end
  return 'ok', allowed, new_used, limit
end

local out = {}
for i = 0, (#ARGV - 2) / 5 - 1 do
  local a = 3 + 5 * i
  local k = 2 + 3 * i
  local ok, status, allowed, used, limit =
    pcall(change, KEYS[k], KEYS[k + 1], KEYS[k + 2], ARGV[a], ARGV[a + 1], ARGV[a + 2] == '1', ARGV[a + 3], ARGV[a + 4])
  if not ok then
    local err = status
    if type(err) == 'table' then err = err.err end
    status, allowed, used, limit = 'err', tostring(err), 0, 0
  end
  out[4 * i + 1], out[4 * i + 2], out[4 * i + 3], out[4 * i + 4] = status, allowed, used, limit
end
return out
