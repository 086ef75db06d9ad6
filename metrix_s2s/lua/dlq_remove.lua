-- dlq_remove.lua: removes one dead letter and its index entries (DeadLetterStore.remove).
-- Included after dlq_drop.lua.
--
-- KEYS[1..4], ARGV[1..3]  as in dlq_drop.lua
-- ARGV[4]  event id
--
-- Returns 1 when an entry was removed.

if drop(ARGV[4], true)[1] then return 1 end
return 0
