-- mark_pending.lua: records freshly enqueued events as pending (Ledger.mark_pending), unless a
-- fast worker already delivered or dead-lettered them.
--
-- KEYS[1]  pending                  P:pending
-- KEYS[2]  pending messages         P:pending:msg
-- ARGV[1]  stem of delivered keys   P:delivered:
-- ARGV[2]  stem of dead letters     P:dlq:entry:
-- ARGV[3]  now, ms
-- ARGV[4...] event id, message (JSON [app_id, event]) pairs

for i = 4, #ARGV, 2 do
  local id = ARGV[i]
  if redis.call('EXISTS', ARGV[1] .. id) == 0 and redis.call('EXISTS', ARGV[2] .. id) == 0 then
    redis.call('ZADD', KEYS[1], ARGV[3], id)
    redis.call('HSET', KEYS[2], id, ARGV[i + 1])
  end
end
