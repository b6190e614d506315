"""The Lua scripts of ``RedisTransport``: each one step that must not be
split by another client's command."""

from __future__ import annotations

__all__ = [
    "CLAIM",
    "DROP_CONSUMER",
    "KEEP",
    "MOVE_DUE",
    "RELEASE",
    "RENEW",
    "SEND",
    "SEND_GROUPED",
]

SEND = """
-- Deliver a result only while its dispatcher's reader is alive.
if redis.call('exists', KEYS[2]) == 1 then
    redis.call('rpush', KEYS[1], ARGV[1])
    redis.call('expire', KEYS[1], ARGV[2])
    return 1
end
return 0
"""

KEEP = """
-- Keep fresh the claims of the entries this consumer still works on (and only
-- those it still owns: one another worker took over stays taken over).
local mine = redis.call('xpending', KEYS[1], ARGV[1], '-', '+', 10000, ARGV[2])
local want = {}
for i = 3, #ARGV do want[ARGV[i]] = true end
local ids = {}
for _, e in ipairs(mine) do
    if want[e[1]] then ids[#ids + 1] = e[1] end
end
if #ids == 0 then return 0 end
local args = {'xclaim', KEYS[1], ARGV[1], ARGV[2], 0}
for _, id in ipairs(ids) do args[#args + 1] = id end
args[#args + 1] = 'JUSTID'  -- refresh only: the delivery count stays
redis.call(unpack(args))
return #ids
"""

DROP_CONSUMER = """
-- Delete a consumer only when it holds nothing (DELCONSUMER drops pending entries).
local p = redis.call('xpending', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #p == 0 then
    return redis.call('xgroup', 'delconsumer', KEYS[1], ARGV[1], ARGV[2])
end
return -1
"""

CLAIM = """
-- Take over entries pending at other consumers for at least ARGV[3] ms (only
-- those of consumer ARGV[6] when given), never one that ARGV[2] (the caller)
-- holds itself; at most ARGV[4] of them, looking at ARGV[5] pending entries.
-- Returns {id, {field, value, ...}, deliveries} per entry taken over.
local xp
if ARGV[6] ~= '' then
    xp = redis.call('xpending', KEYS[1], ARGV[1], 'IDLE', ARGV[3], '-', '+', ARGV[5], ARGV[6])
else
    xp = redis.call('xpending', KEYS[1], ARGV[1], 'IDLE', ARGV[3], '-', '+', ARGV[5])
end
local out = {}
for _, e in ipairs(xp) do
    if e[2] ~= ARGV[2] then
        local got = redis.call('xclaim', KEYS[1], ARGV[1], ARGV[2], ARGV[3], e[1])
        local entry = got[1]
        if entry and entry[2] then
            local p = redis.call('xpending', KEYS[1], ARGV[1], e[1], e[1], 1)
            out[#out + 1] = {entry[1], entry[2], p[1][4]}
            if #out >= tonumber(ARGV[4]) then break end
        elseif entry then
            -- deleted from the stream (Redis < 7 keeps it pending): done with
            redis.call('xack', KEYS[1], ARGV[1], e[1])
        end
    end
end
return out
"""

MOVE_DUE = """
-- Move the delayed envelopes due by ARGV[1] (Unix ms) from the sorted set
-- KEYS[1] to the task stream KEYS[2], in due order, at most ARGV[2] of them.
-- Members are 8 random bytes + the envelope.  Returns {moved, next due or nil}.
local due = redis.call('zrangebyscore', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, m in ipairs(due) do
    redis.call('xadd', KEYS[2], '*', 'd', string.sub(m, 9))
end
if #due > 0 then redis.call('zrem', KEYS[1], unpack(due)) end
local nxt = redis.call('zrange', KEYS[1], 0, 0, 'WITHSCORES')
return {#due, nxt[2] or false}
"""

RENEW = """
-- Extend the lease KEYS[1] by ARGV[2] ms while it still holds our token ARGV[1].
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""

RELEASE = """
-- Delete the lease KEYS[1] only while it holds the token ARGV[1].
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""

SEND_GROUPED = """
-- The results of a batch, grouped by reply list: KEYS[2g-1] a reply list,
-- KEYS[2g] its :alive key; ARGV[1] the TTL, then per list its count n and
-- its n results.  A list gets its results (one RPUSH) only while its
-- dispatcher listens.  Returns 1 (delivered) or 0 (gone) per list.
local ttl = ARGV[1]
local at = 2
local out = {}
for g = 1, #KEYS / 2 do
    local n = tonumber(ARGV[at])
    if redis.call('exists', KEYS[2 * g]) == 1 then
        redis.call('rpush', KEYS[2 * g - 1], unpack(ARGV, at + 1, at + n))
        redis.call('expire', KEYS[2 * g - 1], ttl)
        out[g] = 1
    else
        out[g] = 0
    end
    at = at + n + 1
end
return out
"""
