-- wrk script: POST {"amount":1} as JSON to the URL's path (echo ceiling, hot consume).
wrk.method = "POST"
wrk.body = '{"amount":1}'
wrk.headers["Content-Type"] = "application/json"
