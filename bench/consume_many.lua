-- wrk script: POST {"amount":1} to /quota/p<N>/consume with N uniformly random in 0..9999.
-- The first touch of each provider is a cache miss (loaded from the ledger).
local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("id", counter)
end

function init(args)
  math.randomseed(os.time() * 1000 + (id or 0) * 7919)
end

local headers = { ["Content-Type"] = "application/json" }
local body = '{"amount":1}'

function request()
  return wrk.format("POST", "/quota/p" .. math.random(0, 9999) .. "/consume", headers, body)
end
