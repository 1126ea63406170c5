-- wrk script for benchmarks/bench_serve.py: POST one JSON body to the URL given to wrk, and print
-- the run's figures as one JSON line (prefixed WRK_JSON) for the script to read.
--
--   MNIST_WRK_BODY=body.json wrk -t1 -c64 -d3s -s benchmarks/wrk_predict.lua http://127.0.0.1:8000/predict
--
-- Optional: MNIST_WRK_CONTENT_TYPE (default application/json) and MNIST_WRK_HEADER_LENGTH, sent as
-- Inference-Header-Content-Length (a v2 binary tensor request; benchmarks/bench_v2.py).
--
-- The body is read once per wrk thread and sent unchanged with every request (wrk's static request
-- path: no Lua call per request, so the load generator stays cheap).

local path = os.getenv("MNIST_WRK_BODY")
if path == nil then
  error("set MNIST_WRK_BODY to the JSON body file")
end
local fh = assert(io.open(path, "rb"))
wrk.method = "POST"
wrk.body = fh:read("*a")
fh:close()
wrk.headers["Content-Type"] = os.getenv("MNIST_WRK_CONTENT_TYPE") or "application/json"
local header_length = os.getenv("MNIST_WRK_HEADER_LENGTH")
if header_length ~= nil and header_length ~= "" then
  wrk.headers["Inference-Header-Content-Length"] = header_length
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
