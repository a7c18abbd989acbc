-- wrk script: POST /ratelimit/check for key ip:<N>, N uniformly random in 0..99999
-- (100k distinct keys), limit 1000000, window 1h.
-- Arguments after `--`: [algorithm] (default sliding-window).
local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("id", counter)
end

local algorithm = "sliding-window"
function init(args)
  algorithm = args[1] or algorithm
  math.randomseed(os.time() * 1000 + (id or 0) * 7919)
end

local headers = { ["Content-Type"] = "application/json" }

function request()
  return wrk.format("POST", nil, headers, string.format(
    '{"key":"ip:%d","limit":1000000,"window":"1h","algorithm":"%s"}', math.random(0, 99999), algorithm))
end
