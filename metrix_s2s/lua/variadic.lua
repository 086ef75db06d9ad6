-- variadic.lua: one command for many members, as a function for the scripts that include it
-- (claim.lua, finish.lua, mark_pending.lua). No KEYS or ARGV of its own.
--
-- variadic(command, key, list, option) runs `command key [option] members...` with the members
-- of list, once per 1000 of them (Lua's unpack is bounded), and not at all for an empty list;
-- with key false, `command members...`.

local function variadic(command, key, list, option)
  local n = #list
  for first = 1, n, 1000 do
    local last = math.min(n, first + 999)
    if option then
      redis.call(command, key, option, unpack(list, first, last))
    elseif key then
      redis.call(command, key, unpack(list, first, last))
    else
      redis.call(command, unpack(list, first, last))
    end
  end
end
