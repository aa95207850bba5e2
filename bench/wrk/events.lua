-- POST /events with unique CloudEvents, EVENTS per request (1: structured mode, else a batch),
-- and a JSON summary (requests, latency percentiles in microseconds, statuses) at the end.
local per_request = tonumber(os.getenv("EVENTS") or "1")
local prefix = os.getenv("PREFIX") or "bench"  -- unique per invocation: ids never repeat
local counter = 0
local threads = {}

function setup(thread)
  thread:set("tid", tostring(#threads + 1))
  table.insert(threads, thread)
end

local function event()
  counter = counter + 1
  return '{"specversion":"1.0","id":"' .. prefix .. '-' .. tid .. '-' .. counter .. '",'
    .. '"source":"bench/http","type":"inventory.restocked","time":"2026-12-04T10:00:00Z",'
    .. '"data":{"sku":"SKU-BENCH","quantity":1}}'
end

function init(args)
  wrk.method = "POST"
  if per_request == 1 then
    wrk.headers["Content-Type"] = "application/cloudevents+json"
  else
    wrk.headers["Content-Type"] = "application/cloudevents-batch+json"
  end
end

request = function()
  if per_request == 1 then
    return wrk.format(nil, "/events", nil, event())
  end
  local parts = {}
  for i = 1, per_request do parts[i] = event() end
  return wrk.format(nil, "/events", nil, "[" .. table.concat(parts, ",") .. "]")
end

function done(summary, latency, requests)
  io.write(string.format(
    '{"requests": %d, "seconds": %.3f, "errors": %d, "non_2xx": %d,'
      .. ' "p50_us": %d, "p99_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration / 1e6,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status, latency:percentile(50), latency:percentile(99), latency.mean))
end
