-- wrk script for the sockops benchmark (bench/load.py runs it).
--
-- Arguments after "--": PAYLOAD_BYTES [RATE_PER_THREAD]
--   PAYLOAD_BYTES    size of each POST body (the server answers with a body of the same size)
--   RATE_PER_THREAD  requests per second this wrk thread may send (absent or 0: closed loop)
--
-- The rate limit is an absolute per-thread schedule of send slots spaced 1/RATE apart: each
-- delay() hands the connection that asks the next free slot. wrk only resolves delays to whole
-- milliseconds, but the schedule itself never drifts, so the achieved rate is right on average.
-- Latency is wrk's own (from the write of the request to the end of the response), so with the
-- rate limit it is service time: a request that waits for its slot is not counted as slow.
--
-- done() prints one line "BENCHJSON {...}" with the figures the harness parses.

local ffi = require("ffi")
ffi.cdef([[
typedef struct { long tv_sec; long tv_nsec; } sockops_bench_timespec;
int clock_gettime(int clk_id, sockops_bench_timespec *tp);
]])
local ts = ffi.new("sockops_bench_timespec")
local CLOCK_MONOTONIC = 1

local function now_ms()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) * 1000.0 + tonumber(ts.tv_nsec) / 1e6
end

local interval_ms = 0
local next_slot = nil

function init(args)
  local size = tonumber(args[1] or "1024")
  local rate = tonumber(args[2] or "0")
  wrk.method = "POST"
  wrk.body = string.rep("x", size)
  wrk.headers["Content-Type"] = "application/octet-stream"
  if rate > 0 then
    interval_ms = 1000.0 / rate
  end
end

function delay()
  if interval_ms <= 0 then
    return 0
  end
  local t = now_ms()
  if next_slot == nil or next_slot < t then
    next_slot = t
  end
  local wait = next_slot - t
  next_slot = next_slot + interval_ms
  return math.floor(wait)
end

function done(summary, latency, requests)
  local e = summary.errors
  local fmt = '{"requests":%d,"duration_us":%d,"bytes":%d,"errors":{"connect":%d,"read":%d,'
    .. '"write":%d,"status":%d,"timeout":%d},"latency_us":{"p50":%.1f,"p90":%.1f,"p99":%.1f,'
    .. '"p999":%.1f,"mean":%.1f,"max":%.1f}}'
  io.write("BENCHJSON ")
  io.write(string.format(fmt, summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.mean, latency.max))
  io.write("\n")
end
