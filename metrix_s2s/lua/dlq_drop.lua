-- dlq_drop.lua: drop(victim, forget_redrives), for the dead-letter scripts that include it.
-- Removes one entry with its index entries and returns its fields app_id, reason, event, detail
-- (all nil when there was none); forget_redrives also forgets its re-drive count.
--
-- The including script takes these KEYS and ARGV first:
-- KEYS[1]  every dead letter by time  P:dlq:by_time
-- KEYS[2]  app ids with dead letters  P:dlq:apps
-- KEYS[3]  reasons with dead letters  P:dlq:reasons
-- KEYS[4]  re-drive counts            P:redriven
-- ARGV[1]  stem of entries            P:dlq:entry:
-- ARGV[2]  stem of the app indexes    P:dlq:app:
-- ARGV[3]  stem of the reason indexes P:dlq:reason:

local function drop(victim, forget_redrives)
  local key = ARGV[1] .. victim
  local old = redis.call('HMGET', key, 'app_id', 'reason', 'event', 'detail')
  if old[1] then redis.call('ZREM', ARGV[2] .. old[1], victim) end
  if old[2] then redis.call('ZREM', ARGV[3] .. old[2], victim) end
  redis.call('ZREM', KEYS[1], victim)
  redis.call('DEL', key)
  if forget_redrives then redis.call('HDEL', KEYS[4], victim) end
  return old
end
