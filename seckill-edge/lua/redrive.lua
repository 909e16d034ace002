-- Moves one dead-lettered stream entry back into its voucher's stream, once.
-- KEYS[1] the voucher's dead letters, KEYS[2] its stream (one hash tag);
-- ARGV[1] the dead-letter entry id, ARGV[2] the forwarders' consumer group.
-- Returns the new stream entry id, or false when the entry is gone (moved
-- by an earlier re-drive, or never there): a second re-drive moves nothing.
local entries = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #entries == 0 then
  return false
end
local fields = entries[1][2]
local out = {}
local skipped = false
for i = 1, #fields, 2 do
  -- the first `id` is where the entry was in the stream, added when it was parked
  if fields[i] == 'id' and not skipped then
    skipped = true
  else
    out[#out + 1] = fields[i]
    out[#out + 1] = fields[i + 1]
  end
end
-- where it came from, for the audit (the forwarder ignores unknown fields)
out[#out + 1] = 'rd'
out[#out + 1] = ARGV[1]
-- the stream may be gone with its group (nothing would read the entry):
-- a group made here reads the stream from its start; BUSYGROUP is fine
redis.pcall('XGROUP', 'CREATE', KEYS[2], ARGV[2], '0', 'MKSTREAM')
local id = redis.call('XADD', KEYS[2], '*', unpack(out))
redis.call('XDEL', KEYS[1], ARGV[1])
return id
