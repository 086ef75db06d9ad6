-- dlq_take.lua: takes one dead letter out of the store to re-enqueue it (DeadLetterStore.take),
-- in one atomic step: the entry leaves the store, its re-drive count goes up, its attempt budget
-- is reset, and it is recorded as pending (with its message), so that if the caller dies before
-- publishing it, the reconciler does. Included after dlq_drop.lua.
--
-- KEYS[1..4], ARGV[1..3]  as in dlq_drop.lua
-- KEYS[5]  pending                  P:pending
-- KEYS[6]  pending messages         P:pending:msg
-- ARGV[4]  stem of attempt counts   P:tries:
-- ARGV[5]  event id
-- ARGV[6]  now, ms
-- ARGV[7]  re-drive limit (-1: none)
-- ARGV[8]  the reasons that may be taken, as ",a,b,"
--
-- Returns {'ok', app_id, event JSON}, {'gone'}, {'skipped', reason} or {'limit', reason}; past
-- the limit, the entry's reason becomes redrive_limit.

local id, now, limit = ARGV[5], ARGV[6], tonumber(ARGV[7])
local key = ARGV[1] .. id
local reason = redis.call('HGET', key, 'reason')
if not reason then return {'gone'} end
if reason == 'invalid' or not string.find(ARGV[8], ',' .. reason .. ',', 1, true) then
  return {'skipped', reason}
end
local count = tonumber(redis.call('HGET', KEYS[4], id) or '0')
if limit >= 0 and count >= limit then
  if reason ~= 'redrive_limit' then
    local score = redis.call('ZSCORE', KEYS[1], id)
    local detail = redis.call('HGET', key, 'detail') or ''
    redis.call('ZREM', ARGV[3] .. reason, id)
    redis.call('ZADD', ARGV[3] .. 'redrive_limit', score, id)
    redis.call('SADD', KEYS[3], 'redrive_limit')
    redis.call('HSET', key, 'reason', 'redrive_limit', 'detail',
               're-driven ' .. count .. ' times, the limit; last failure (' .. reason .. '): '
               .. detail)
  end
  return {'limit', reason}
end
local old = drop(id, false)
redis.call('HSET', KEYS[4], id, count + 1)
redis.call('ZADD', KEYS[5], now, id)
redis.call('HSET', KEYS[6], id, '[' .. cjson.encode(old[1]) .. ',' .. old[3] .. ']')
redis.call('DEL', ARGV[4] .. id)
return {'ok', old[1], old[3]}
