-- claim.lua: claims one or more events of one app, in order, before they are sent
-- (Ledger.claim_many). Included after gcra.lua and variadic.lua.
--
-- KEYS[1]  pending                  P:pending
-- KEYS[2]  the app's pause          P:pause:{app_id}
-- KEYS[3]  the app's bucket         P:rl:{app_id}
-- KEYS[4]  the overall bucket       P:rl:*
-- KEYS[5]  the app's line           P:rl:{app_id}:later
-- ARGV[1]  stem of delivered keys   P:delivered:
-- ARGV[2]  stem of in-flight guards P:inflight:
-- ARGV[3]  stem of attempt counts   P:tries: ("<attempts>:<ms of the first>")
-- ARGV[4]  guard TTL, ms
-- ARGV[5]  attempts TTL, s
-- ARGV[6]  app emission, us         ARGV[7] app tolerance, us
-- ARGV[8]  overall emission, us (0: no overall limit)    ARGV[9] overall tolerance, us
-- ARGV[10] longest wait for a slot spent in the worker, us
-- ARGV[11] '1': an event without a slot soon gets a place in the app's line of deferred events;
--          '0': it and every event after it come back 'limited', with nothing reserved
-- ARGV[12...] event id, token pairs
--
-- Returns Redis' time in ms, then {state, value, first attempt ms, wait ms} for each event, the
-- state one of ok (value: the attempt number), delivered, busy (value: the guard's TTL), paused
-- (value: the pause left), limited (value: the time until a slot or the place in line).

local now_us = (function()
  local t = redis.call('TIME')
  return t[1] * 1000000 + t[2]
end)()
local now = math.floor(now_us / 1000)
local app_emission, app_tolerance = tonumber(ARGV[6]), tonumber(ARGV[7])
local overall, overall_tolerance = tonumber(ARGV[8]), tonumber(ARGV[9])
local max_wait = tonumber(ARGV[10])
local paused = redis.call('PTTL', KEYS[2])
local stopped = nil
local seen = {}  -- the pending records of the events claimed: seen now
local out = {now}
local function put(state, value, first, wait)
  out[#out + 1] = state
  out[#out + 1] = value
  out[#out + 1] = first
  out[#out + 1] = wait
end
for i = 12, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  local guard, attempts = ARGV[2] .. id, ARGV[3] .. id
  -- MGET reads a key of another type (an attempt count of an earlier version) as absent
  local found = redis.call('MGET', ARGV[1] .. id, guard, attempts)
  local holder = found[2]
  if found[1] then
    put('delivered', 0, 0, 0)
  elseif holder and holder ~= token then
    put('busy', redis.call('PTTL', guard), 0, 0)
  elseif paused > 0 then
    put('paused', paused, 0, 0)
  elseif stopped then
    put('limited', stopped, 0, stopped)
  else
    local wait, tat = gcra(KEYS[3], app_emission, app_tolerance, now_us)
    local overall_tat = 0
    if overall > 0 then
      local overall_wait
      overall_wait, overall_tat = gcra(KEYS[4], overall, overall_tolerance, now_us)
      if overall_wait > wait then wait = overall_wait end
    end
    if wait > max_wait and ARGV[11] == '1' then
      -- No slot soon: a place in the app's line of deferred events instead, one emission
      -- interval after the last, so that deferred events come back spread out rather than all
      -- at once (they claim a real slot when they come back).
      local start = now_us + wait
      local later = arrival(KEYS[5])
      if later > start then start = later end
      local slot = start + app_emission
      take_tat(KEYS[5], slot)
      local later_ms = math.ceil((slot - now_us) / 1000)
      put('limited', later_ms, 0, later_ms)
    elseif wait > max_wait then
      stopped = math.ceil((wait - max_wait) / 1000)
      put('limited', stopped, 0, stopped)
    else
      local wait_ms = math.ceil(wait / 1000)
      take_tat(KEYS[3], tat)
      if overall > 0 then take_tat(KEYS[4], overall_tat) end
      redis.call('SET', guard, token, 'PX', tonumber(ARGV[4]) + wait_ms)
      local n, first = 1, now
      local counted, since = string.match(found[3] or '', '^(%-?%d+):(%d+)$')
      if counted then
        n, first = tonumber(counted) + 1, tonumber(since)
      end
      redis.call('SET', attempts, string.format('%d:%.0f', n, first), 'EX', ARGV[5])
      seen[#seen + 1] = now
      seen[#seen + 1] = id
      put('ok', n, first, wait_ms)
    end
  end
end
store_tats(now_us)
variadic('ZADD', KEYS[1], seen, 'XX')
return out
