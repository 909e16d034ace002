-- wrk script of `./dev bench seckill_edge` (run.sh): POST /seckill/<voucher>
-- with a different customer JWT on every request, so every attempt of the
-- admitted path is a distinct user.
--
--   wrk -t2 -c64 -d10s --latency -s seckill.lua URL -- TOKENS VOUCHER_ID THREADS
--
-- Thread i reads TOKENS.<i> (written by `edge_bench tokens N TOKENS --split T`,
-- T = wrk's -t = THREADS) and builds all its requests in init(), so a request
-- costs wrk one table lookup. A thread that runs out of tokens starts over
-- (counted in `wrapped`: the admitted path then gets 409 already_purchased).
--
-- wrk runs init() of thread i+1 while thread i already sends, and starts its
-- clock after the last init: building 400,000 requests takes about a second
-- here, which would let thread 0 send uncounted-time requests. So every
-- thread's first request() waits until the last thread's init() has created
-- the file TOKENS.go.VOUCHER_ID (polled every 10 ms): all threads start
-- together, within ~10 ms of wrk's clock. (wrk's main thread calls thread 0's
-- request() once, before any thread runs, to check the request: that call
-- must not wait.)
--
-- No response() callback (it would make wrk parse every header into Lua): the
-- status split comes from wrk's own count of responses >= 400. done() prints
-- one line for run.sh:
--   RESULT requests= seconds= rps= ok_2xx= non_2xx= socket_errors= p50_ms= p90_ms= p99_ms= max_ms= wrapped=

local threads = {}

function setup(thread)
  thread:set("index", #threads)
  table.insert(threads, thread)
end

function init(args)
  local file = assert(io.open(args[1] .. "." .. index, "rb"))
  local data = file:read("*a")
  file:close()
  local head = "POST /seckill/" .. args[2] .. " HTTP/1.1\r\n"
    .. "Host: " .. wrk.host .. ":" .. tostring(wrk.port) .. "\r\n"
    .. "Content-Length: 0\r\n"
    .. "Authorization: Bearer "
  local tail = "\r\n\r\n"
  reqs = {}
  local n = 0
  for token in data:gmatch("[^\n]+") do
    n = n + 1
    reqs[n] = head .. token .. tail
  end
  assert(n > 0, "no tokens in " .. args[1] .. "." .. index)
  total = n
  next_req = 0
  wrapped = 0
  go_file = args[1] .. ".go." .. args[2]
  ready = index == tonumber(args[3]) - 1
  checked = index ~= 0
  if ready then
    assert(io.open(go_file, "w")):close()
  end
end

local function wait_for_go()
  while true do
    local file = io.open(go_file, "r")
    if file then
      file:close()
      return
    end
    os.execute("sleep 0.01")
  end
end

function request()
  if not checked then
    checked = true
    return reqs[1]
  end
  if not ready then
    wait_for_go()
    ready = true
  end
  next_req = next_req + 1
  if next_req > total then
    next_req = 1
    wrapped = wrapped + 1
  end
  return reqs[next_req]
end

function done(summary, latency, requests)
  local wraps = 0
  for _, thread in ipairs(threads) do
    wraps = wraps + thread:get("wrapped")
  end
  local e = summary.errors
  local seconds = summary.duration / 1e6
  io.write(string.format(
    "RESULT requests=%d seconds=%.3f rps=%.1f ok_2xx=%d non_2xx=%d socket_errors=%d"
      .. " p50_ms=%.3f p90_ms=%.3f p99_ms=%.3f max_ms=%.3f wrapped=%d\n",
    summary.requests, seconds, summary.requests / seconds,
    summary.requests - e.status, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000, wraps))
end
