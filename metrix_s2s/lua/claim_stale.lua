-- claim_stale.lua: the reconciler takes one stale pending event (Ledger.claim_stale), marking
-- it seen now only if nobody else did since it was examined.
--
-- KEYS[1]  pending                  P:pending
-- ARGV[1]  event id
-- ARGV[2]  the score it had when examined
-- ARGV[3]  now, ms
--
-- Returns 1 when this caller won, 0 otherwise.

local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  return 1
end
return 0
