-- wrk script: POST /ratelimit/check for key ip:<N>, N uniformly random in 0..99999
-- (100k distinct keys), limit 1000000, window 1h.
-- Arguments after `--`: [algorithm] (default sliding-window).
-- The 100 000 requests are formatted once per thread in init() (about 15 MB): request()
-- only picks one, so the load generator costs about what the static requests cost.
local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("id", counter)
end

local requests = {}
function init(args)
  local algorithm = args[1] or "sliding-window"
  math.randomseed(os.time() * 1000 + (id or 0) * 7919)
  local headers = { ["Content-Type"] = "application/json" }
  for n = 0, 99999 do
    requests[n + 1] = wrk.format("POST", nil, headers, string.format(
      '{"key":"ip:%d","limit":1000000,"window":"1h","algorithm":"%s"}', n, algorithm))
  end
end

function request()
  return requests[math.random(1, #requests)]
end
