-- dlq_add.lua: records (or updates) one dead letter (DeadLetterStore.add), then applies the
-- retention period and the size cap. Included after dlq_drop.lua.
--
-- KEYS[1..4], ARGV[1..3]  as in dlq_drop.lua
-- ARGV[4]  event id
-- ARGV[5]  app id
-- ARGV[6]  reason
-- ARGV[7]  now, ms
-- ARGV[8]  retention, ms
-- ARGV[9]  most entries kept
-- ARGV[10] most entries dropped by one call, for retention or the cap
-- ARGV[11...] field, value pairs of the entry
--
-- Returns 1 when the entry is new, 0 when an existing one was updated.

local id, app, reason = ARGV[4], ARGV[5], ARGV[6]
local now, retention, cap = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local trim = tonumber(ARGV[10])
local by_time = KEYS[1]

local key = ARGV[1] .. id
local old = redis.call('HMGET', key, 'app_id', 'reason')
if old[1] and old[1] ~= app then redis.call('ZREM', ARGV[2] .. old[1], id) end
if old[2] and old[2] ~= reason then redis.call('ZREM', ARGV[3] .. old[2], id) end

redis.call('HSETNX', key, 'first_failed_ms', now)
local redriven = redis.call('HGET', KEYS[4], id) or '0'
redis.call('HSET', key, 'event_id', id, 'app_id', app, 'reason', reason, 'last_failed_ms', now,
           'redriven', redriven)
for i = 11, #ARGV, 2 do
  redis.call('HSET', key, ARGV[i], ARGV[i + 1])
end
redis.call('ZADD', by_time, now, id)
redis.call('ZADD', ARGV[2] .. app, now, id)
redis.call('ZADD', ARGV[3] .. reason, now, id)
redis.call('SADD', KEYS[2], app)
redis.call('SADD', KEYS[3], reason)

for _, victim in ipairs(redis.call('ZRANGEBYSCORE', by_time, '-inf', '(' .. (now - retention),
                                   'LIMIT', 0, trim)) do
  drop(victim, true)
end
local excess = redis.call('ZCARD', by_time) - cap
if excess > 0 then
  for _, victim in ipairs(redis.call('ZRANGE', by_time, 0, math.min(excess, trim) - 1)) do
    drop(victim, true)
  end
end
if old[1] then return 0 end
return 1
