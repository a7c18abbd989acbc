-- One rate-limit check, and anomaly counting for plan-based keys, in one round trip.
-- Mirrors domain::ratelimit::decide exactly (integer arithmetic; the differential property
-- test compares the two).
-- KEYS[1] counter: sorted set of admitted requests (sw), or one integer, as small as a key
--         can be: the count (fw) or prev * 2^21 + curr (swa), whose window start is implied
--         by the key's expiry time (start + window, start + 2 windows), or the arrival time (tb)
-- KEYS[2] sliding-window's running sum and sequence (hash)
-- KEYS[3] the key's anomaly attempt counter for its plan
-- KEYS[4] anomaly list (outside the key's slot: on Redis Cluster it would be per slot)
-- ARGV[1] algorithm: sw | swa | fw | tb; ARGV[2] limit; ARGV[3] window ms; ARGV[4] cost
-- ARGV[5] now in ms ('' : Redis TIME; tests pass a time), ARGV[6] plan ('' : no anomaly
-- counting), ARGV[7] anomaly threshold, ARGV[8] key, ARGV[9] anomaly list length
-- Returns {allowed 0/1, remaining, reset ms, retry-after ms, now ms, anomaly count (0: none)}
local function f(n) return string.format('%d', n) end
local now
if ARGV[5] ~= '' then
  now = tonumber(ARGV[5])
else
  local t = redis.call('TIME')
  now = t[1] * 1000 + math.floor(t[2] / 1000)
end
local algo, limit, window, cost = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local need = math.max(cost, 1)
local allowed, remaining, reset, retry = 0, 0, now, 0

if algo == 'sw' then
  local cutoff = now - window
  local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', f(cutoff))
  local sum = tonumber(redis.call('HGET', KEYS[2], 'sum') or '0')
  for _, m in ipairs(expired) do sum = sum - tonumber(string.match(m, ':(%d+)$')) end
  if #expired > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', f(cutoff)) end
  if sum + need <= limit then
    allowed = 1
    if cost > 0 then
      local seq = redis.call('HINCRBY', KEYS[2], 'seq', 1)
      redis.call('ZADD', KEYS[1], f(now), f(now) .. ':' .. seq .. ':' .. f(cost))
      sum = sum + cost
    end
  end
  remaining = math.max(0, limit - sum)
  local newest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  if newest[2] then reset = tonumber(newest[2]) + window end
  if allowed == 0 then
    local excess, freed = sum + need - limit, 0
    -- every entry frees at least 1, so `excess` entries are enough
    local all = redis.call('ZRANGE', KEYS[1], 0, excess - 1, 'WITHSCORES')
    for i = 1, #all, 2 do
      freed = freed + tonumber(string.match(all[i], ':(%d+)$'))
      if freed >= excess then
        retry = tonumber(all[i + 1]) + window - now
        break
      end
    end
  end
  if sum > 0 then
    redis.call('HSET', KEYS[2], 'sum', f(sum))
    redis.call('PEXPIRE', KEYS[1], f(reset - now))
    redis.call('PEXPIRE', KEYS[2], f(reset - now))
  else
    redis.call('DEL', KEYS[1], KEYS[2])
  end
elseif algo == 'fw' then
  local start, count = now, 0
  local v = redis.call('GET', KEYS[1])
  if v then
    start, count = redis.call('PEXPIRETIME', KEYS[1]) - window, tonumber(v)
  end
  if now >= start + window then -- a window starts with the first request after the last ended
    start = now
    count = 0
  end
  if count + need <= limit then
    allowed = 1
    count = count + cost
  end
  local finish = start + window
  if count > 0 then reset = finish end
  retry = math.max(0, finish - now)
  remaining = math.max(0, limit - count)
  redis.call('SET', KEYS[1], f(count), 'PXAT', f(finish))
elseif algo == 'swa' then
  local start, prev, curr = now, 0, 0
  local v = redis.call('GET', KEYS[1])
  if v then
    local packed = tonumber(v)
    start = redis.call('PEXPIRETIME', KEYS[1]) - 2 * window
    prev, curr = math.floor(packed / 2097152), packed % 2097152
  end
  if now >= start + 2 * window then -- both windows over (as the key expiring): afresh
    start, prev, curr = now, 0, 0
  elseif now >= start + window then
    start, prev, curr = start + window, curr, 0
  end
  local elapsed = math.min(math.max(0, now - start), window)
  local function fits(p, c, e) return math.floor(p * (window - e) / window) + c + need <= limit end
  local estimate = math.floor(prev * (window - elapsed) / window) + curr
  if estimate + need <= limit then
    allowed = 1
    curr = curr + cost
    estimate = estimate + cost
  end
  if curr > 0 then reset = start + 2 * window elseif prev > 0 then reset = start + window end
  if allowed == 0 then
    -- the earliest offset into a window at which a request of this cost fits
    local p, c, base, lo = prev, curr, start, elapsed
    if curr + need > limit then p, c, base, lo = curr, 0, start + window, 0 end
    local hi = window
    while lo < hi do
      local mid = math.floor((lo + hi) / 2)
      if fits(p, c, mid) then hi = mid else lo = mid + 1 end
    end
    retry = base + lo - now
  end
  remaining = math.max(0, limit - estimate)
  redis.call('SET', KEYS[1], f(prev * 2097152 + curr), 'PXAT', f(start + 2 * window))
else -- tb: GCRA, one theoretical arrival time per key, burst = limit
  local tat = tonumber(redis.call('GET', KEYS[1]) or f(now))
  local base = math.max(tat, now)
  local allow_at = base + math.floor((need * window + limit - 1) / limit) - window
  if now >= allow_at then
    allowed = 1
    if cost > 0 then tat = base + math.floor((cost * window + limit - 1) / limit) end
  end
  local level = math.max(tat, now)
  remaining = math.min(limit, math.floor(math.max(0, now + window - level) * limit / window))
  reset = level
  retry = allow_at - now
  if level > now then
    redis.call('SET', KEYS[1], f(tat), 'PX', f(level - now))
  else
    redis.call('DEL', KEYS[1])
  end
end

if reset < now then reset = now end
if allowed == 1 then retry = 0 elseif retry < 1 then retry = 1 end

local anomaly = 0
if ARGV[6] ~= '' then
  local attempts = redis.call('INCR', KEYS[3])
  if attempts == 1 then redis.call('PEXPIRE', KEYS[3], 300000) end
  if attempts == tonumber(ARGV[7]) + 1 then
    anomaly = attempts
    redis.call('LPUSH', KEYS[4], cjson.encode({key = ARGV[8], plan = ARGV[6], count = f(attempts),
      threshold = ARGV[7], atMs = f(now)}))
    redis.call('LTRIM', KEYS[4], 0, tonumber(ARGV[9]) - 1)
  end
end
return {allowed, remaining, reset, retry, now, anomaly}
