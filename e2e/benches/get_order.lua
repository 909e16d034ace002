-- wrk script of the read_side benchmark (`./dev bench read_side query`):
-- GET /orders/{id} for a random id of a file, as an admin.
--
--   wrk -t2 -c64 -d10s --latency -s get_order.lua URL -- IDS_FILE TOKEN
--
-- IDS_FILE holds one order id a line; TOKEN is a JWT sent as a bearer token.

local threads = 0

-- runs in the main interpreter, once per thread: gives each its own seed
function setup(thread)
  threads = threads + 1
  thread:set("thread_number", threads)
end

local ids = {}
local headers = {}

function init(args)
  for line in io.lines(args[1]) do
    if line ~= "" then
      ids[#ids + 1] = line
    end
  end
  assert(#ids > 0, "no ids in " .. args[1])
  headers["Authorization"] = "Bearer " .. args[2]
  math.randomseed(os.time() * 100 + (thread_number or 0))
end

function request()
  return wrk.format("GET", "/orders/" .. ids[math.random(#ids)], headers)
end
