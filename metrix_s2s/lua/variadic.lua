-- variadic.lua: one command for many members, as a function for the scripts that include it
-- (claim.lua, finish.lua, mark_pending.lua). No KEYS or ARGV of its own.
--
-- variadic(head, list) runs the command `head` (a table: the command, its key and options) with
-- the members of list appended, once per 1000 of them (Lua's unpack is bounded), and not at all
-- for an empty list.

local function variadic(head, list)
  local n, h = #list, #head
  for first = 1, n, 1000 do
    local args = {unpack(head)}
    for i = first, math.min(n, first + 999) do
      args[h + i - first + 1] = list[i]
    end
    redis.call(unpack(args))
  end
end
