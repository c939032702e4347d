-- Sends pre-made HTTP requests, each wrk thread its own file, and counts the answers.
--
--   wrk -t2 -c64 -d15s --latency -s requests.lua http://127.0.0.1:PORT -- PREFIX
--
-- Thread k (0-based) loads PREFIX.k: length-prefixed raw requests ("<bytes>\n<request>").
-- Files hold distinct requests, so no request is sent twice across threads unless a thread
-- runs out and starts its file again; `repeats` counts those. The answers' statuses, and the
-- relay's "accepted"/"duplicates" counts when the body has them, are tallied per thread and
-- printed by done() as one line of JSON after the marker BENCH_RESULT.

local threads = {}
local next_id = 0

function setup(thread)
   thread:set("id", next_id)
   next_id = next_id + 1
   table.insert(threads, thread)
end

function init(args)
   local path = args[1] .. "." .. id
   local f = assert(io.open(path, "rb"))
   reqs = {}
   while true do
      local line = f:read("*l")
      if not line then break end
      reqs[#reqs + 1] = f:read(tonumber(line))
   end
   f:close()
   n = #reqs
   assert(n > 0, "no requests in " .. path)
   pos = 0
   issued = 0
   repeats = 0
   accepted = 0
   duplicates = 0
   statuses = {}
end

function request()
   pos = pos + 1
   if pos > n then
      pos = 1
   end
   issued = issued + 1
   if issued > n then
      repeats = repeats + 1
   end
   return reqs[pos]
end

function response(status, headers, body)
   local key = tostring(status)
   statuses[key] = (statuses[key] or 0) + 1
   if body then
      local a = string.match(body, '"accepted":%s*(%d+)')
      if a then accepted = accepted + tonumber(a) end
      local d = string.match(body, '"duplicates":%s*(%d+)')
      if d then duplicates = duplicates + tonumber(d) end
   end
end

function done(summary, latency, requests)
   local total = {issued = 0, loaded = 0, repeats = 0, accepted = 0, duplicates = 0}
   local by_status = {}
   for _, t in ipairs(threads) do
      total.issued = total.issued + t:get("issued")
      total.loaded = total.loaded + t:get("n")
      total.repeats = total.repeats + t:get("repeats")
      total.accepted = total.accepted + t:get("accepted")
      total.duplicates = total.duplicates + t:get("duplicates")
      for k, v in pairs(t:get("statuses")) do
         by_status[k] = (by_status[k] or 0) + v
      end
   end
   local parts = {}
   for k, v in pairs(by_status) do
      parts[#parts + 1] = string.format('"%s":%d', k, v)
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH_RESULT {"duration_us":%d,"requests":%d,"bytes":%d,'
      .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
      .. '"latency_us":{"mean":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d},'
      .. '"issued":%d,"loaded":%d,"repeats":%d,"accepted":%d,"duplicates":%d,'
      .. '"by_status":{%s}}\n',
      summary.duration, summary.requests, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
      latency:percentile(99), latency:percentile(99.9),
      total.issued, total.loaded, total.repeats, total.accepted, total.duplicates,
      table.concat(parts, ",")))
end
