-- finish.lua: records the end of one or more attempts of one app's events
-- (Ledger.finish_many). Included after variadic.lua.
--
-- KEYS[1]  pending                  P:pending
-- KEYS[2]  pending messages         P:pending:msg
-- KEYS[3]  re-drive counts          P:redriven
-- KEYS[4]  the app's pause          P:pause:{app_id}
-- KEYS[5]  the broker's unacked index (kombu's unacked_index; optional, with KEYS[6])
-- KEYS[6]  the broker's unacked messages (kombu's unacked)
-- ARGV[1]  stem of delivered keys   P:delivered:
-- ARGV[2]  stem of in-flight guards P:inflight:
-- ARGV[3]  stem of attempt counts   P:tries:
-- ARGV[4]  ledger TTL, s
-- ARGV[5]  pause, ms (after a 429; 0: none)
-- ARGV[6...] event id, token, mode, value, delivery tag quintuples. Modes (FinishMode):
--   delivered  record the delivery (value "<status>:<ms>") and forget the event everywhere else
--   final      it was dead-lettered: forget its attempts and its pending record
--   retry      keep them, and mark it seen now
--   undo       as retry, and take back the attempt its claim counted (nothing was sent)
--
-- A delivery tag (empty: none) names the message the attempt came in: a delivered or final
-- attempt removes the broker's record of it (metrix_s2s.unacked), so that its acknowledgement
-- needs no round trip. A pause is lengthened, never shortened. Releases each guard its attempt
-- still holds; returns, for each attempt in order, 1 if it released its guard, else 0.

local now = nil
local released = {}
local delivered, done, attempts_done, seen, tags = {}, {}, {}, {}, {}
for i = 6, #ARGV, 5 do
  local id, token, mode = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local attempts = ARGV[3] .. id
  if mode == 'delivered' then
    redis.call('SET', ARGV[1] .. id, ARGV[i + 3], 'EX', ARGV[4])
    delivered[#delivered + 1] = id
  end
  if mode == 'retry' or mode == 'undo' then
    if not now then
      local t = redis.call('TIME')
      now = t[1] * 1000 + math.floor(t[2] / 1000)
    end
    seen[#seen + 1] = now
    seen[#seen + 1] = id
    if mode == 'undo' then
      local counted, since = string.match(redis.call('MGET', attempts)[1] or '', '^(%-?%d+):(%d+)$')
      if counted then
        redis.call('SET', attempts, string.format('%d:%s', tonumber(counted) - 1, since), 'KEEPTTL')
      end
    end
  else
    done[#done + 1] = id
    attempts_done[#attempts_done + 1] = attempts
    if ARGV[i + 4] ~= '' then tags[#tags + 1] = ARGV[i + 4] end
  end
  local guard = ARGV[2] .. id
  if redis.call('GET', guard) == token then
    redis.call('DEL', guard)
    released[#released + 1] = 1
  else
    released[#released + 1] = 0
  end
end
variadic('HDEL', KEYS[3], delivered)
variadic('ZADD', KEYS[1], seen, 'XX')
variadic('DEL', false, attempts_done)
variadic('ZREM', KEYS[1], done)
variadic('HDEL', KEYS[2], done)
if KEYS[6] then
  variadic('ZREM', KEYS[5], tags)
  variadic('HDEL', KEYS[6], tags)
end
local pause = tonumber(ARGV[5])
if pause > 0 and redis.call('PTTL', KEYS[4]) < pause then
  redis.call('SET', KEYS[4], '1', 'PX', pause)
end
return released
