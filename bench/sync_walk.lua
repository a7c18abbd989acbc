-- wrk script for bench/sync.sh: POST {"amount":1} to /quota/s<i>/consume for every i in
-- 0..N-1 exactly once. Arguments after `--`: N THREADS (THREADS = wrk's -t).
-- Thread t (0-based) takes i = t, t + THREADS, t + 2*THREADS, ...; once its share is sent it
-- asks GET /healthz every 100 ms per connection (consumes nothing) until sync.sh, which
-- watches Redis's dirty set, stops wrk with SIGINT. done() prints how many consumes were
-- sent, answered and not 200.
-- wrk 4.1 calls thread 1's request() once before the run to check that it parses, and sends
-- nothing for that call: so thread 1's first call returns GET /healthz and takes no i.
local threads = {}
local count = 0
function setup(thread)
  thread:set("tid", count)
  count = count + 1
  table.insert(threads, thread)
end

n, step, nexti, sent, answered, bad = 0, 1, 0, 0, 0, 0
local headers = { ["Content-Type"] = "application/json" }
local body = '{"amount":1}'

local first = true

function init(args)
  n = tonumber(args[1])
  step = tonumber(args[2])
  nexti = tid
  first = (tid == 0)
end

function delay()
  if nexti < n then return 0 end
  return 100
end

function request()
  if first then
    first = false
    return wrk.format("GET", "/healthz")
  end
  if nexti < n then
    local path = "/quota/s" .. nexti .. "/consume"
    nexti = nexti + step
    sent = sent + 1
    return wrk.format("POST", path, headers, body)
  end
  return wrk.format("GET", "/healthz")
end

function response(status, headers, body)
  if status == 200 and body and body:find('"status":"ok"', 1, true) then
    return -- a /healthz answer
  end
  answered = answered + 1
  if status ~= 200 then bad = bad + 1 end
end

function done(summary, latency, requests)
  local s, a, b = 0, 0, 0
  for _, t in ipairs(threads) do
    s = s + t:get("sent")
    a = a + t:get("answered")
    b = b + t:get("bad")
  end
  io.write(string.format("walk: consumes sent %d, answered %d, not 200 %d\n", s, a, b))
end
