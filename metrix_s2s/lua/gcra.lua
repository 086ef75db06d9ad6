-- gcra.lua: the generic cell rate algorithm, as functions for the scripts that include it
-- (claim.lua). No KEYS or ARGV of its own; times are microseconds of Redis' clock.
--
-- Each bucket is read once per script call and written once at its end, however many events of
-- the call take a slot from it.
--
-- gcra(key, emission, tolerance, now) -> wait before the caller's slot, the bucket's next
--   arrival time. The caller keeps the latter with take_tat only when it takes the slot.
-- arrival(key) -> the bucket's arrival time (0: empty), as this call left it so far.
-- take_tat(key, tat) keeps a bucket's new arrival time for store_tats.
-- store_tats(now) stores every arrival time taken, each expiring once it is in the past.

local tats, taken = {}, {}

local function arrival(key)
  local tat = tats[key]
  if tat == nil then
    tat = tonumber(redis.call('GET', key) or '0')
    tats[key] = tat
  end
  return tat
end

local function gcra(key, emission, tolerance, now)
  local tat = arrival(key)
  if tat < now then tat = now end
  local wait = tat - tolerance - now
  if wait < 0 then wait = 0 end
  return wait, tat + emission
end

local function take_tat(key, tat)
  tats[key] = tat
  taken[key] = true
end

local function store_tats(now)
  for key in pairs(taken) do
    local tat = tats[key]
    redis.call('SET', key, string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
  end
end
