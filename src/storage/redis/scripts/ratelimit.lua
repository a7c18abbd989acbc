-- Rate-limit checks, and anomaly counting for plan-based keys, in one round trip: the
-- checks that concurrent requests made ready together (one or more) are decided in order,
-- exactly as if each had been its own call.
-- Mirrors domain::ratelimit::decide exactly (integer arithmetic; the differential property
-- test compares the two).
-- KEYS[1] anomaly list (outside the keys' slots: on Redis Cluster it would be per slot)
-- per item, in order:
-- its counter: sorted set of admitted requests (sw; member 'ms:seq:cost', score ms; the
--         checks of one call at one ms share a member), or one integer, as small as a key can
--         be: the count (fw) or prev * 2^21 + curr (swa), whose window start is implied by
--         the key's expiry time (start + window, start + 2 windows), or the token bucket's
--         limit * 2^20 + gap (gcra), whose expiry time is the ms the bucket is full again
--         and gap the 1/limit ms from the exact theoretical arrival time up to that ms;
-- then, for sw only, the sliding window's running sum and sequence (hash);
-- then, for a plan-based check only, the key's anomaly attempt counter (one per key, for
--         all its plans; it lives 5 minutes from its first attempt and holds 2 x attempts,
--         plus 1 once that window's anomaly is recorded)
-- ARGV[1] anomaly list length
-- per item (n identical checks in a row: a hot key's checks of one call are one item, whose
-- arguments are read and converted once), from ARGV[a] (a = 2 for the first): ARGV[a] n; ARGV[a + 1]
-- algorithm: sw | swa | fw | gcra; ARGV[a + 2] limit; ARGV[a + 3] window ms; ARGV[a + 4]
-- cost; ARGV[a + 5] now in ms ('': Redis TIME, read once per call; tests pass a time);
-- ARGV[a + 6] plan ('': no anomaly counting, and the item's last argument); with a plan,
-- ARGV[a + 7] anomaly threshold and ARGV[a + 8] key
-- Returns one string per check: allowed 0/1, remaining, reset ms, retry-after ms, now ms and
-- anomaly count (0: none), separated by spaces (one bulk string parses much faster than six
-- integers); or 'err ' and the error, when the check failed (each check runs under pcall:
-- Redis keeps the writes of the checks before a failing one, so they must be answered, not
-- failed with it; an item's later checks may still succeed: a broken anomaly list fails
-- only the check that records the anomaly). A check's reads, which fail on a key holding
-- another type, come before it changes its counter: a check answered 'err' has consumed
-- nothing (its attempt, counted first, stays counted).
-- Each key is read once per call and written once at its end, however many of the call's
-- checks it takes (one hot key: the usual case under load); nothing outside the script sees
-- the difference, since it runs atomically. (A fixed or approximate window still running
-- is read with INCRBY by the first check's cost, and the end writes only what differs.)
-- The writes at the end cannot fail: each key was read, so it has the right type, SET
-- replaces whatever it holds, and an INCRBY that fails falls back to SET.
local function f(n) return string.format('%d', n) end
local redis_now
local function time_now()
  if not redis_now then
    local t = redis.call('TIME')
    redis_now = t[1] * 1000 + math.floor(t[2] / 1000)
  end
  return redis_now
end


-- string counters (fw, swa, gcra): key -> {v = number | false, base = the value in Redis,
-- rat = its expiry time in Redis (ms; -1: none, -2: no key), at = the expiry time to
-- write, mode = nil | 'pxat' | 'del'}. Only an admitted cost writes a counter: a read
-- (cost 0) or a denied check leaves it as it was (a read never starts a window).
local strings = {}
-- exact windows: counter key -> {sums, sum, seq, last, trimmed = the cutoff applied,
-- pending = {score, member, ...} not yet added, low = the lowest pending score, px,
-- pend_at, pend_seq, pend_cost = the newest pending member's score, sequence and cost,
-- changed = members were trimmed or added (or the newest looked up): the end writes it}
local windows = {}
-- anomaly attempt counters: key -> {n = attempts, recorded = this window's anomaly is,
-- add = what the end adds to the key (2 an attempt since the INCRBY, 1 for the record),
-- queued = the end writes it}
local tries = {}
-- the keys to write at the end, each kind in the order first written
local put_strings, put_windows, put_tries = {}, {}, {}

local function number_of(key, v)
  local n = tonumber(v)
  if v and not n then error('ERR the counter ' .. key .. ' does not hold a number') end
  return n or false
end

-- a counter whose expiry time is part of its state: a window counter's (fw, swa) implies
-- its window start, a bucket's (gcra) when it is full again. When a window counter's
-- (current) window still runs `margin` ms after `now`, the first read adds `cost`
-- at once (INCRBY keeps the expiry) and returns the value from before: an admitted check
-- then leaves nothing to write, and a denied one writes the difference back at the end.
local function get_expiring(key, now, cost, margin)
  local e = strings[key]
  if not e then
    local t = redis.call('PEXPIRETIME', key)
    e = {rat = t, at = t}
    if t == -2 then -- no such key
      e.v, e.base = false, false
    elseif margin and cost > 0 and now + margin < t then
      local n = redis.call('INCRBY', key, cost)
      e.v, e.base = n - cost, n
    else
      e.v = number_of(key, redis.call('GET', key))
      e.base = e.v
    end
    strings[key] = e
  end
  return e
end

-- floor(n / d) and the remainder, exactly for 0 <= n < 2^53
local function divmod(n, d)
  local r = math.fmod(n, d)
  return (n - r) / d, r
end

local function ceil_div(n, d)
  local q, r = divmod(n, d)
  if r > 0 then return q + 1 end
  return q
end

local function put(key, e, value, mode, t)
  if not e.mode then put_strings[#put_strings + 1] = key end
  e.v, e.mode, e.at = value, mode, t
end

-- a check that admitted no cost leaves its window counter as it was read, and a read
-- that added its cost (see get_expiring) has the end take it back
local function take_back(key, e)
  if e.v ~= e.base and not e.mode then put(key, e, e.v, 'pxat', e.at) end
end

-- a counter without an expiry time (set by hand, or restored) holds no state (its expiry
-- is part of it) and would never go: unless a check wrote it, it is deleted
local function forget_immortal(key, e)
  if e.rat == -1 and not e.mode then put(key, e, false, 'del') end
end

local function window_state(counter, sums)
  local w = windows[counter]
  if not w then
    local h = redis.call('HMGET', sums, 'sum', 'seq', 'last', 'lseq')
    w = {sums = sums, sum = tonumber(h[1] or '0'), seq = tonumber(h[2] or '0'), last = tonumber(h[3]),
      pending = {}}
    if h[4] ~= h[2] then w.last = nil end
    windows[counter] = w
  end
  return w
end

local function add_pending(counter, w)
  if #w.pending > 0 then
    redis.call('ZADD', counter, unpack(w.pending))
    w.pending, w.low = {}, nil
  end
end

local function check(counter, sums, attempts_key, algo, limit, window, cost, now, plan, threshold, key)
  -- the attempt first: it counts whatever the decision, and what can fail in it (the
  -- anomaly list or the attempt counter holding another type) fails before the check has
  -- changed its counter (a check answered 'err' consumes nothing)
  local anomaly = 0
  if plan ~= '' then
    local t = tries[attempts_key]
    if t then -- counted once with INCRBY already: the rest of the call's attempts add up here
      t.n, t.add = t.n + 1, t.add + 2
      if not t.queued then
        t.queued = true
        put_tries[#put_tries + 1] = attempts_key
      end
    else
      local v = redis.call('INCRBY', attempts_key, 2)
      -- a value no attempts could reach (set by hand) fails here, not in the end's INCRBY
      if v > 2 ^ 52 then error('ERR the attempt counter ' .. attempts_key .. ' is out of range') end
      -- the window starts at the ms this check is decided at, as the twin's does
      if v == 2 then redis.call('PEXPIREAT', attempts_key, f(now + 300000)) end
      t = {n = math.floor(v / 2), recorded = v % 2 == 1, add = 0}
      tries[attempts_key] = t
    end
    local attempts = t.n
    -- the first attempt above this plan's threshold records the window's anomaly (one per
    -- key and window, whichever of its plans the attempts were made under); marked before
    -- the list is written, so a broken list fails this check only
    if not t.recorded and attempts > tonumber(threshold) then
      t.recorded, t.add = true, t.add + 1
      if not t.queued then
        t.queued = true
        put_tries[#put_tries + 1] = attempts_key
      end
      anomaly = attempts
      redis.call('LPUSH', KEYS[1], cjson.encode({key = key, plan = plan, count = f(attempts),
        threshold = threshold, atMs = f(now)}))
      redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[1]) - 1)
    end
  end
  local need = math.max(cost, 1)
  local allowed, remaining, reset, retry = 0, 0, now, 0

  if algo == 'sw' then
    -- the sums hash holds the running sum, the member sequence, and the newest member's
    -- score with the sequence it was written at (while the set is not empty its newest
    -- member never expires first). `last` is trusted only at its own sequence: a writer
    -- that does not keep it (an older quotad during a rolling deploy) moves `seq` on.
    local cutoff = now - window
    local w = window_state(counter, sums)
    if not w.trimmed or cutoff > w.trimmed or (w.low and w.low <= cutoff) then
      add_pending(counter, w)
      local expired = redis.call('ZRANGEBYSCORE', counter, '-inf', f(cutoff))
      for _, m in ipairs(expired) do w.sum = w.sum - tonumber(string.match(m, ':(%d+)$')) end
      if #expired > 0 then
        redis.call('ZREMRANGEBYSCORE', counter, '-inf', f(cutoff))
        w.changed = true
      end
      if not w.trimmed or cutoff > w.trimmed then w.trimmed = cutoff end
    end
    if w.sum > 0 and not w.last then
      w.last = tonumber(redis.call('ZRANGE', counter, -1, -1, 'WITHSCORES')[2])
      w.changed = true -- kept for the next calls
    end
    if w.sum + need <= limit then
      allowed = 1
      if cost > 0 then
        local n = #w.pending
        if n > 0 and w.pend_at == now then
          -- one member per score: the call's checks at the same ms (all of them, with Redis
          -- TIME) add up in the newest pending member, which expires with them
          w.pend_cost = w.pend_cost + cost
          w.pending[n] = w.pending[n - 1] .. ':' .. f(w.pend_seq) .. ':' .. f(w.pend_cost)
        else
          w.seq = w.seq + 1
          local score = f(now)
          w.pending[n + 1] = score
          w.pending[n + 2] = score .. ':' .. f(w.seq) .. ':' .. f(cost)
          w.pend_at, w.pend_seq, w.pend_cost = now, w.seq, cost
        end
        if not w.low or now < w.low then w.low = now end
        w.sum = w.sum + cost
        w.changed = true
        if not w.last or now > w.last then w.last = now end
      end
    end
    local sum, last = w.sum, w.last
    remaining = math.max(0, limit - sum)
    if sum > 0 and last then reset = last + window end
    if allowed == 0 then
      add_pending(counter, w)
      local excess, freed = sum + need - limit, 0
      -- every entry frees at least 1, so `excess` entries are enough
      local all = redis.call('ZRANGE', counter, 0, excess - 1, 'WITHSCORES')
      for i = 1, #all, 2 do
        freed = freed + tonumber(string.match(all[i], ':(%d+)$'))
        if freed >= excess then
          retry = tonumber(all[i + 1]) + window - now
          break
        end
      end
    end
    if sum > 0 and reset > now then
      -- a read or a denied check that trimmed nothing leaves both keys as they are: their
      -- expiry, one window after the newest member, is where the last write set it
      if w.changed and not w.listed then
        w.listed = true
        put_windows[#put_windows + 1] = counter
      end
      w.px = reset - now
    else -- nothing left, or a sum without members (reset = now): both keys go, afresh
      redis.call('DEL', counter, sums)
      w.sum, w.seq, w.last, w.pending, w.low, w.trimmed, w.px = 0, 0, nil, {}, nil, cutoff, nil
    end
  elseif algo == 'fw' then
    local start, count = now, 0
    local e = get_expiring(counter, now, cost, 0)
    if e.v and e.v > 0 then
      start, count = e.at - window, e.v
    end
    -- a window starts with the first admitted request after the last window ended
    if now >= start + window then
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
    if allowed == 1 and cost > 0 then put(counter, e, count, 'pxat', finish) else take_back(counter, e) end
    forget_immortal(counter, e)
  elseif algo == 'swa' then
    local start, prev, curr = now, 0, 0
    local e = get_expiring(counter, now, cost, window)
    if e.v and e.v > 0 then
      local packed = e.v
      start = e.at - 2 * window
      prev, curr = math.floor(packed / 2097152), packed % 2097152
    end
    if now >= start + 2 * window then -- both windows over (as the key expiring): afresh
      start, prev, curr = now, 0, 0
    elseif now >= start + window then
      start, prev, curr = start + window, curr, 0
    end
    local elapsed = math.min(math.max(0, now - start), window)
    local estimate = math.floor(prev * (window - elapsed) / window) + curr
    if estimate + need <= limit then
      allowed = 1
      curr = curr + cost
      estimate = estimate + cost
    end
    -- full again once the estimate is 0: the current count has become the previous window's
    -- and weighs less than 1, from floor(window * (count - 1) / count) + 1 into that window
    if curr > 0 then
      reset = start + window + divmod(window * (curr - 1), curr) + 1
    elseif prev > 0 then
      reset = start + divmod(window * (prev - 1), prev) + 1
    end
    if allowed == 0 then
      -- the earliest offset into a window at which a request of this cost fits
      local p, c, base, lo = prev, curr, start, elapsed
      if curr + need > limit then p, c, base, lo = curr, 0, start + window, 0 end
      local hi = window
      while lo < hi do
        local mid = math.floor((lo + hi) / 2)
        if math.floor(p * (window - mid) / window) + c + need <= limit then hi = mid else lo = mid + 1 end
      end
      retry = base + lo - now
    end
    remaining = math.max(0, limit - estimate)
    if allowed == 1 and cost > 0 then
      put(counter, e, prev * 2097152 + curr, 'pxat', start + 2 * window)
    else
      take_back(counter, e)
    end
    forget_immortal(counter, e)
  else -- gcra: GCRA, burst = limit
    -- the debt, in units of 1/limit ms: a request costs `window` of them at any limit, so
    -- the debt counts requests (debt / window) and a changed limit applies to the requests
    -- counted. Exact in doubles: every value stays below 2^53 (limit * window <= 2.6e15).
    -- It drains at the rate of the limit it was written at until an admitted request writes
    -- it at its own: reset and retry follow what the bucket will do.
    local e = get_expiring(counter, now, 0, nil)
    local debt, rate = 0, limit
    if e.v and e.at > now then
      local written_at, gap = divmod(e.v, 1048576)
      if written_at < 1 or written_at > 1000000 or gap >= written_at then
        error('ERR the counter ' .. counter .. ' does not hold a token bucket')
      end
      debt = math.max(0, (e.at - now) * written_at - gap)
      if debt > 0 then rate = written_at end
    end
    local room = (limit - need) * window
    if debt <= room then
      allowed = 1
      if cost > 0 then
        debt = debt + cost * window
        local ahead = ceil_div(debt, limit)
        put(counter, e, limit * 1048576 + ahead * limit - debt, 'pxat', now + ahead)
        rate = limit
      end
    end
    forget_immortal(counter, e)
    remaining = math.max(0, limit - ceil_div(debt, window))
    reset = now + ceil_div(debt, rate)
    retry = ceil_div(math.max(0, debt - room), rate)
  end

  if reset < now then reset = now end
  if allowed == 1 then retry = 0 elseif retry < 1 then retry = 1 end
  return allowed, remaining, reset, retry, now, anomaly
end

local out = {}
local function answer(allowed, remaining, reset, retry, at, anomaly)
  -- each %d costs Redis ~0.1 µs: the usual answers write fewer
  if anomaly ~= 0 then
    out[#out + 1] = string.format('%d %d %d %d %d %d', allowed, remaining, reset, retry, at, anomaly)
  elseif allowed == 1 then -- retry is 0
    out[#out + 1] = string.format('1 %d %d 0 %d 0', remaining, reset, at)
  else
    out[#out + 1] = string.format('0 %d %d %d %d 0', remaining, reset, retry, at)
  end
end

local function failed(err)
  if type(err) == 'table' then err = err.err end
  out[#out + 1] = 'err ' .. tostring(err)
end

local k, a = 2, 2
while a <= #ARGV do
  local n, algo, plan = tonumber(ARGV[a]), ARGV[a + 1], ARGV[a + 6]
  local counter, sums, attempts, threshold, key = KEYS[k], nil, nil, nil, nil
  k = k + 1
  if algo == 'sw' then
    sums = KEYS[k]
    k = k + 1
  end
  if plan ~= '' then
    attempts, threshold, key = KEYS[k], ARGV[a + 7], ARGV[a + 8]
    k = k + 1
  end
  local now = ARGV[a + 5] ~= '' and tonumber(ARGV[a + 5]) or time_now()
  local limit, window, cost = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  for _ = 1, n do -- each check of the item answered as if sent alone
    local ok, allowed, remaining, reset, retry, at, anomaly =
      pcall(check, counter, sums, attempts, algo, limit, window, cost, now, plan, threshold, key)
    if ok then answer(allowed, remaining, reset, retry, at, anomaly) else failed(allowed) end
  end
  a = a + (attempts and 9 or 7)
end

-- the keys' final states
for _, key in ipairs(put_strings) do
  local e = strings[key]
  if e.mode == 'pxat' then
    if e.base and e.at == e.rat then -- the same window: the key keeps its expiry
      if e.v ~= e.base then
        -- INCRBY changes the value in place; SET would also remove and re-add the expiry
        local r = redis.pcall('INCRBY', key, f(e.v - e.base))
        if type(r) == 'table' then redis.call('SET', key, f(e.v), 'PXAT', f(e.at)) end
      end
    else
      redis.call('SET', key, f(e.v), 'PXAT', f(e.at))
    end
  else
    redis.call('DEL', key)
  end
end
for _, key in ipairs(put_windows) do
  local z = windows[key]
  if z.px then
    add_pending(key, z)
    if z.last then
      redis.call('HSET', z.sums, 'sum', f(z.sum), 'seq', f(z.seq), 'last', f(z.last), 'lseq', f(z.seq))
    else -- a sum whose newest member is unknown (the set was lost): reset = now
      redis.call('HSET', z.sums, 'sum', f(z.sum), 'seq', f(z.seq))
    end
    redis.call('PEXPIRE', key, f(z.px))
    redis.call('PEXPIRE', z.sums, f(z.px))
  end
end
for _, key in ipairs(put_tries) do
  redis.call('INCRBY', key, tries[key].add)
end
return out
