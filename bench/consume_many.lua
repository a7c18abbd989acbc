-- wrk script: POST {"amount":1} to /quota/p<N>/consume with N uniformly random in 0..9999.
-- The first touch of each provider is a cache miss (loaded from the ledger).
-- The 10 000 requests are formatted once per thread in init(): request() only picks one,
-- so the load generator spends about what it spends on the static requests of the other
-- lines (formatting per request cost wrk enough CPU to show in the ratio).
local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("id", counter)
end

local requests = {}
function init(args)
  math.randomseed(os.time() * 1000 + (id or 0) * 7919)
  local headers = { ["Content-Type"] = "application/json" }
  for n = 0, 9999 do
    requests[n + 1] = wrk.format("POST", "/quota/p" .. n .. "/consume", headers, '{"amount":1}')
  end
end

function request()
  return requests[math.random(1, #requests)]
end
