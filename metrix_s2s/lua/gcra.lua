-- gcra.lua: the generic cell rate algorithm, as functions for the scripts that include it
-- (claim.lua). No KEYS or ARGV of its own; times are microseconds of Redis' clock.
--
-- gcra(key, emission, tolerance, now) -> wait before the caller's slot, the bucket's next
--   arrival time. The caller stores the latter with store_tat only when it takes the slot.
-- store_tat(key, tat, now) stores an arrival time, expiring once it is in the past.

local function gcra(key, emission, tolerance, now)
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local wait = tat - tolerance - now
  if wait < 0 then wait = 0 end
  return wait, tat + emission
end

local function store_tat(key, tat, now)
  redis.call('SET', key, string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
end
