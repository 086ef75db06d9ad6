-- release_lock.lua: releases a lock only for its holder (locks.redis_lock), so a run that
-- outlived its timeout cannot release the lock of the run that took over.
--
-- KEYS[1]  the lock                 P:lock:{name}
-- ARGV[1]  the holder's token
--
-- Returns 1 when the lock was released.

if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
