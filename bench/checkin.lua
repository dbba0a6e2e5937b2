-- wrk script of bench/checkin.py: each request is one device's check-in, the devices
-- in turn. Arguments: the tokens file (one a line), the job's check-in path.
local started = 0
function setup(thread)
   started = started + 1
   thread:set("id", started)
end

function init(args)
   tokens = {}
   for line in io.lines(args[1]) do
      table.insert(tokens, line)
   end
   path = args[2]
   nxt = id
end

function request()
   local token = tokens[(nxt % #tokens) + 1]
   nxt = nxt + 7
   return wrk.format("POST", path, {
      ["Authorization"] = "Bearer " .. token,
      ["Content-Type"] = "application/json",
   }, "{}")
end

function done(summary, latency, requests)
   io.write(string.format("RESULT requests=%d seconds=%.6f p50_ms=%.3f p99_ms=%.3f errors=%d\n",
      summary.requests, summary.duration / 1e6, latency:percentile(50) / 1000,
      latency:percentile(99) / 1000,
      summary.errors.status + summary.errors.connect + summary.errors.read
      + summary.errors.write + summary.errors.timeout))
end
