"""Lua scripts: each one is a single atomic step on the server.

FETCH    pops up to N envelopes across the given lists (in order), stopping early once they
         add up to a byte budget, and records each one in the unacked hash and index in the
         same step, so a consumer that dies right after a fetch loses nothing (kombu records
         after the pop, leaving a window). The tag and delivery info are found with plain
         string searches (the envelope is decoded whole only when they are not where kombu
         writes them).
RESTORE  moves unacked entries back to their queues: either every entry whose index score is
         at or below a ceiling (the visibility-timeout sweep, which also delivers parked delayed
         messages, see ``broker.py``) or the given tags (reject with requeue, consumer close).
         Entries are re-routed like kombu does (exchange ``''`` or the exchange's binding set,
         priority bucket from the envelope), with ``headers.redelivered = true`` except for
         parked messages (their ``celeriac_not_before`` marker is dropped instead). Corrupt
         entries go to the dead-letter list.
"""

from __future__ import annotations

__all__ = ["FETCH", "RESTORE"]

FETCH = r"""
-- KEYS[1]=unacked KEYS[2]=unacked_index KEYS[3]=dead letter list, KEYS[4..]=queue lists
-- ARGV[1]=max count ARGV[2]=now ARGV[3]=record (1) or not (0)
-- ARGV[4]=byte budget: stop once the envelopes taken reach it (the first is always taken)
-- Returns a flat list of (list index from 1, envelope); index 0 = moved to the dead letters.
local n = tonumber(ARGV[1])
local record = ARGV[3] == '1'
local budget = tonumber(ARGV[4]) or 0
if budget <= 0 then budget = math.huge end
local taken = 0
local out = {}

-- Where the last occurrence of `needle` ends, or nil. Plain finds skip a megabyte of base64
-- body in microseconds; a pattern match tries every position (7 ms per MB).
local function last_end(env, needle)
  local found, pos = nil, 1
  while true do
    local _, e = string.find(env, needle, pos, true)
    if not e then return found end
    found, pos = e, e + 1
  end
end

-- The properties are the envelope's last key, so the last "delivery_tag" is theirs.
local function tag_of(env)
  local e = last_end(env, '"delivery_tag": "')
  if not e then return nil end
  local close = string.find(env, '"', e + 1, true)
  if not close or close == e + 1 then return nil end
  local tag = string.sub(env, e + 1, close - 1)
  if string.find(tag, '\\', 1, true) then return nil end  -- escaped: left to the JSON decoder
  return tag
end

local function info_of(env)
  local e = last_end(env, '"delivery_info": {')
  if not e then return nil end
  return string.match(env, '^"exchange": ("[^"]*"), "routing_key": ("[^"]*")', e + 1)
end

for i = 4, #KEYS do
  -- One envelope first: its size says how many more fit in the budget (all n for small ones).
  local want = 1
  while n > 0 and taken < budget do
    local items = redis.call('RPOP', KEYS[i], math.min(n, want))
    if not items then break end
    local size = 0
    for _, env in ipairs(items) do
      size = #env
      taken = taken + size
      local ok = false
      if record then
        local tag = tag_of(env)
        local ex, rk = info_of(env)
        if not (tag and ex) then  -- not spaced as kombu writes it (or escapes): decode it all
          tag, ex = nil, nil
          local dok, t = pcall(cjson.decode, env)
          if dok and type(t) == 'table' and type(t.properties) == 'table'
             and type(t.properties.delivery_info) == 'table'
             and type(t.properties.delivery_tag) == 'string' and t.properties.delivery_tag ~= '' then
            local info = t.properties.delivery_info
            tag = t.properties.delivery_tag
            ex = cjson.encode(tostring(info.exchange or ''))
            rk = cjson.encode(tostring(info.routing_key or ''))
          end
        end
        if tag and ex then
          redis.call('HSET', KEYS[1], tag, '[' .. env .. ', ' .. ex .. ', ' .. rk .. ']')
          redis.call('ZADD', KEYS[2], ARGV[2], tag)
          ok = true
        end
      else
        ok = true
      end
      n = n - 1
      if ok then
        out[#out + 1] = i - 3
        out[#out + 1] = env
      else
        redis.call('LPUSH', KEYS[3], env)
        out[#out + 1] = 0
        out[#out + 1] = env
      end
    end
    want = math.max(1, math.floor((budget - taken) / math.max(size, 1)))
  end
end
return out
"""

RESTORE = r"""
-- KEYS[1]=unacked KEYS[2]=unacked_index KEYS[3]=dead letter list
-- ARGV[1]=mode 'sweep'|'tags' ARGV[2]=ceiling score (sweep) ARGV[3]=limit (sweep)
-- ARGV[4]=key prefix ARGV[5]=sep ARGV[6]=priority steps csv ARGV[7]='front'|'back'
-- ARGV[8..]=tags (mode 'tags')
local prefix, sep = ARGV[4], ARGV[5]
local steps = {}
for s in string.gmatch(ARGV[6], '[^,]+') do steps[#steps + 1] = tonumber(s) end
local front = ARGV[7] == 'front'

local function first_object(s)
  local start = string.find(s, '{', 1, true)
  if not start then return nil end
  local depth, pos = 0, start
  while true do
    local p = string.find(s, '[{}"]', pos)
    if not p then return nil end
    local c = string.sub(s, p, p)
    if c == '"' then
      -- the closing quote: the next one not escaped (plain finds: a base64 body is megabytes)
      local q = p + 1
      while true do
        local r = string.find(s, '"', q, true)
        if not r then return nil end
        local k = r - 1
        while string.byte(s, k) == 92 do k = k - 1 end
        if (r - 1 - k) % 2 == 0 then pos = r + 1; break end
        q = r + 1
      end
    elseif c == '{' then
      depth = depth + 1; pos = p + 1
    else
      depth = depth - 1; pos = p + 1
      if depth == 0 then return string.sub(s, start, p) end
    end
  end
end

local function mark_redelivered(env)
  local s, e = string.find(env, '"headers": {', 1, true)
  if not s then return env end
  local ins = '"redelivered": true'
  if string.sub(env, e + 1, e + 1) ~= '}' then ins = ins .. ', ' end
  return string.sub(env, 1, e) .. ins .. string.sub(env, e + 1)
end

-- Drop the parked marker from the properties (the envelope's last key: the last occurrence).
local function drop_marker(env)
  local s, e
  local from = 1
  while true do
    local a, b = string.find(env, '"celeriac_not_before": ', from, true)
    if not a then break end
    s, e, from = a, b, b + 1
  end
  if not s then return env end
  local _, num = string.find(env, '^[-0-9.eE+]+', e + 1)
  if not num then return env end
  if string.sub(env, num + 1, num + 2) == ', ' then
    return string.sub(env, 1, s - 1) .. string.sub(env, num + 3)
  elseif string.sub(env, s - 2, s - 1) == ', ' then
    return string.sub(env, 1, s - 3) .. string.sub(env, num + 1)
  end
  return env
end

local function topic_match(key, rk)
  -- kombu's topic semantics: '*' = one word ([^.]+), '#' = anything (.-), words joined by '.'
  local parts = {}
  for w in string.gmatch(key .. '.', '([^.]*)%.') do
    if w == '#' then parts[#parts + 1] = '.-'
    elseif w == '*' then parts[#parts + 1] = '[^.]+'
    else parts[#parts + 1] = (string.gsub(w, '[%^%$%(%)%%%.%[%]%*%+%-%?]', '%%%0')) end
  end
  return string.find(rk, '^' .. table.concat(parts, '%.') .. '$') ~= nil
end

local function lookup(exchange, rk)
  if exchange == '' then return {rk} end
  local found = {}
  local members = redis.call('SMEMBERS', prefix .. '_kombu.binding.' .. exchange)
  for _, m in ipairs(members) do
    local a = string.find(m, sep, 1, true)
    if a then
      local b = string.find(m, sep, a + #sep, true)
      if b then
        local key = string.sub(m, 1, a - 1)
        local pattern = string.sub(m, a + #sep, b - 1)
        local queue = string.sub(m, b + #sep)
        if pattern == '' then
          if key == rk or key == '' then found[#found + 1] = queue end
        elseif topic_match(key, rk) then
          found[#found + 1] = queue
        end
      end
    end
  end
  return found
end

local function bucket(pri)
  local v = tonumber(pri) or 0
  if v < 0 then v = 0 end
  if v > 9 then v = 9 end
  local chosen = 0
  for _, s in ipairs(steps) do if s <= v then chosen = s end end
  return chosen
end

local tags
if ARGV[1] == 'sweep' then
  tags = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
else
  tags = {}
  for i = 8, #ARGV do tags[#tags + 1] = ARGV[i] end
end
local moved = 0
-- The entry with an empty body, for cjson: only the fields around the body are read, and
-- decoding a megabyte of base64 costs milliseconds. Unchanged when the body is not a plain string.
local function without_body(raw)
  local pre = '[{"body": "'
  if string.sub(raw, 1, #pre) ~= pre then return raw end
  local close = string.find(raw, '"', #pre + 1, true)
  if not close then return raw end
  local bs = string.find(raw, '\\', #pre + 1, true)
  if bs and bs < close then return raw end
  return pre .. string.sub(raw, close)
end

for _, tag in ipairs(tags) do
  local raw = redis.call('HGET', KEYS[1], tag)
  redis.call('ZREM', KEYS[2], tag)
  redis.call('HDEL', KEYS[1], tag)
  if raw then
    local ok, t = pcall(cjson.decode, without_body(raw))
    local env = nil
    if ok and type(t) == 'table' and type(t[1]) == 'table' then env = first_object(raw) end
    if env then
      local props = t[1].properties
      if type(props) ~= 'table' then props = {} end
      local headers = t[1].headers
      local parked = props['celeriac_not_before'] ~= nil
      if parked then
        -- due now: drop the marker, so a later restore of it counts as a redelivery
        env = drop_marker(env)
      elseif type(headers) == 'table' and headers.redelivered == nil then
        env = mark_redelivered(env)
      end
      local b = bucket(props.priority)
      local queues = lookup(tostring(t[2] or ''), tostring(t[3] or ''))
      if #queues == 0 then redis.call('LPUSH', KEYS[3], env) end
      for _, q in ipairs(queues) do
        local key = prefix .. q
        if b > 0 then key = key .. sep .. b end
        if front then redis.call('RPUSH', key, env) else redis.call('LPUSH', key, env) end
      end
      moved = moved + 1
    else
      redis.call('LPUSH', KEYS[3], raw)
    end
  end
end
local nxt = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
return {moved, nxt[2] or false}
"""
