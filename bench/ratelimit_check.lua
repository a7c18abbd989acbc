-- wrk script: POST /ratelimit/check with an explicit policy, the same body every request.
-- Arguments after `--`: <algorithm> [key] [limit] [window]
-- (defaults: sliding-window, hot, 1000000 (API.md's largest limit), 1h).
-- The body is built once per thread in init(), so the request stays static as in post_json.lua.
function init(args)
  local algorithm = args[1] or "sliding-window"
  local key = args[2] or "hot"
  local limit = args[3] or "1000000"
  local window = args[4] or "1h"
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.body = string.format('{"key":"%s","limit":%s,"window":"%s","algorithm":"%s"}',
    key, limit, window, algorithm)
end
