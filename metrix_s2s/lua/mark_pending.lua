-- mark_pending.lua: records freshly enqueued events as pending (Ledger.mark_pending), unless a
-- fast worker already delivered or dead-lettered them. Included after variadic.lua.
--
-- KEYS[1]  pending                  P:pending
-- KEYS[2]  pending messages         P:pending:msg
-- ARGV[1]  stem of delivered keys   P:delivered:
-- ARGV[2]  stem of dead letters     P:dlq:entry:
-- ARGV[3]  now, ms
-- ARGV[4...] event id, message (JSON [app_id, event]) pairs

local scored, messages = {}, {}
for i = 4, #ARGV, 2 do
  local id = ARGV[i]
  if redis.call('EXISTS', ARGV[1] .. id, ARGV[2] .. id) == 0 then
    scored[#scored + 1] = ARGV[3]
    scored[#scored + 1] = id
    messages[#messages + 1] = id
    messages[#messages + 1] = ARGV[i + 1]
  end
end
variadic('ZADD', KEYS[1], scored)
variadic('HSET', KEYS[2], messages)
