"""The Lua scripts of named queues and priorities over Redis
(``redis_channels``): each one step no other client's command may split."""

from __future__ import annotations

__all__ = ["MOVE_ROUTED", "TAKE"]

TAKE = """
-- Take up to ARGV[3] new entries for consumer ARGV[2] of group ARGV[1] from
-- the channel streams KEYS, in that order (queues in serving order, priority
-- 9 first): the first non-empty channel first, the rest of the batch from the
-- next ones.  ARGV[4] = '1': an aging take (one entry from the lowest
-- non-empty priority of the first queue that has any, then the usual order).
-- ARGV[4 + i]: the queue number of KEYS[i].  A stream without the group (made
-- by a producer before any worker) gets it, from its first entry.
-- Returns {1, {{key index, id, {field, value, ...}}, ...}} or, when every
-- channel is empty, {0, {the group's last-delivered id per key}}: an XREAD
-- from those ids wakes on the next entry of any of them, without a race.
local group, me = ARGV[1], ARGV[2]
local want = tonumber(ARGV[3])
local out = {}
local function take(i, n)
    local k = KEYS[i]
    local r = redis.pcall('xreadgroup', 'group', group, me, 'count', n, 'streams', k, '>')
    if type(r) == 'table' and r.err then
        if redis.call('exists', k) == 0 then return 0 end
        redis.call('xgroup', 'create', k, group, '0')
        r = redis.call('xreadgroup', 'group', group, me, 'count', n, 'streams', k, '>')
    end
    if not r then return 0 end
    local got = 0
    for _, e in ipairs(r[1][2]) do
        if e[2] then
            out[#out + 1] = {i, e[1], e[2]}
            got = got + 1
        end
    end
    return got
end
if ARGV[4] == '1' then
    local i = 1
    while i <= #KEYS and #out == 0 do
        local j = i
        while j < #KEYS and ARGV[5 + j] == ARGV[4 + i] do j = j + 1 end
        for x = j, i, -1 do
            if take(x, 1) > 0 then break end
        end
        i = j + 1
    end
end
for i = 1, #KEYS do
    if #out >= want then break end
    take(i, want - #out)
end
if #out > 0 then return {1, out} end
local ids = {}
for i = 1, #KEYS do
    local last = '0-0'
    if redis.call('exists', KEYS[i]) == 1 then
        for _, g in ipairs(redis.call('xinfo', 'groups', KEYS[i])) do
            local name, lid
            for x = 1, #g, 2 do
                if g[x] == 'name' then name = g[x + 1] end
                if g[x] == 'last-delivered-id' then lid = g[x + 1] end
            end
            if name == group and lid then last = lid end
        end
    end
    ids[i] = last
end
return {0, ids}
"""

MOVE_ROUTED = """
-- Move due delayed envelopes to their channels: KEYS[1] the sorted set,
-- KEYS[2] the channel registry, KEYS[3..] the channel streams; per envelope
-- ARGV holds (member, stream index in KEYS, registry member or '').  A member
-- another process moved meanwhile is skipped (ZREM is the test): each one is
-- moved once, in the order given.  Returns how many were moved.
local moved = 0
for a = 1, #ARGV, 3 do
    if redis.call('zrem', KEYS[1], ARGV[a]) == 1 then
        if ARGV[a + 2] ~= '' then redis.call('sadd', KEYS[2], ARGV[a + 2]) end
        redis.call('xadd', KEYS[tonumber(ARGV[a + 1])], '*', 'd', string.sub(ARGV[a], 9))
        moved = moved + 1
    end
end
return moved
"""
