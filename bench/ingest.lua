-- wrk script of bench/ingest.py: each request uploads one device's update, every device
-- once. Arguments: the devices file (one "token round_id" per line), the body file,
-- the number of wrk threads. Thread k sends devices k, k + threads, k + 2 threads, ...
local started = 0
function setup(thread)
   started = started + 1
   thread:set("id", started)
end

function init(args)
   devices = {}
   for line in io.lines(args[1]) do
      local token, round = line:match("(%S+) (%S+)")
      table.insert(devices, { token, round })
   end
   local f = assert(io.open(args[2], "rb"))
   body = f:read("*all")
   f:close()
   step = tonumber(args[3])
   nxt = id
end

function request()
   local i = nxt
   if i > #devices then
      wrk.thread:stop()
      i = id -- a connection still asks: the first device again (its receipt, once more)
   end
   nxt = nxt + step
   local device = devices[i]
   return wrk.format("POST", "/v1/rounds/" .. device[2] .. "/updates", {
      ["Authorization"] = "Bearer " .. device[1],
      ["Idempotency-Key"] = "u" .. i,
      ["Content-Type"] = "application/octet-stream",
   }, body)
end

function done(summary, latency, requests)
   io.write(string.format("RESULT requests=%d seconds=%.6f p50_ms=%.3f p99_ms=%.3f errors=%d\n",
      summary.requests, summary.duration / 1e6, latency:percentile(50) / 1000,
      latency:percentile(99) / 1000,
      summary.errors.status + summary.errors.connect + summary.errors.read
      + summary.errors.write + summary.errors.timeout))
end
