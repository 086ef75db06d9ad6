-- fetch.lua: takes messages off a consumer's queues and records each one as unacknowledged in
-- the same step (metrix_s2s.workers.transport), where kombu's BRPOP takes one and a second round
-- trip records it. Never blocks: with every queue empty it returns nothing, and the consumer
-- waits with kombu's BRPOP instead.
--
-- KEYS[1]  the broker's unacked index (kombu's unacked_index)
-- KEYS[2]  the broker's unacked messages (kombu's unacked)
-- KEYS[3...] the queues, each at each priority, in kombu's order (as its BRPOP takes them)
-- ARGV[1]  now, s (the consumer's clock, as kombu's record has it)
-- ARGV[2]  most messages to take
--
-- Takes from the first of those keys (a queue at one priority) that has messages, up to ARGV[2]
-- of them. Returns that key's place in KEYS (3...), then 1 if it stopped at a message it cannot
-- record (no delivery tag, exchange and routing key: it stays first in its queue, for the
-- consumer to take as kombu does), else 0, then the messages it took; an empty table with every
-- queue empty.

local most = tonumber(ARGV[2])
for i = 3, #KEYS do
  local out = {i, 0}
  while #out < most + 2 do
    local item = redis.call('RPOP', KEYS[i])
    if not item then break end
    local ok, message = pcall(cjson.decode, item)
    local properties = ok and type(message) == 'table' and message.properties
    local info = type(properties) == 'table' and properties.delivery_info
    local tag = type(properties) == 'table' and properties.delivery_tag
    if type(info) == 'table' and type(tag) == 'string' and type(info.exchange) == 'string'
        and type(info.routing_key) == 'string' then
      redis.call('ZADD', KEYS[1], ARGV[1], tag)
      redis.call('HSET', KEYS[2], tag,
        '[' .. item .. ',' .. cjson.encode(info.exchange) .. ',' .. cjson.encode(info.routing_key) .. ']')
      out[#out + 1] = item
    else
      redis.call('RPUSH', KEYS[i], item)  -- back where it was, first in line
      out[2] = 1
      break
    end
  end
  if #out > 2 or out[2] == 1 then
    return out
  end
end
return {}
