"""Redis keys, limits and the Lua scripts that make each read-check-write atomic."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from policyd.store import (
    Admission,
)

#: Every key starts with this, so policyd can share a Redis database.
PREFIX = "policyd:"
ACTIVE = PREFIX + "active"
BLOCKS = PREFIX + "blocks"
SEQUENCE = PREFIX + "seq"
AUDIT = PREFIX + "audit"
OUTBOX = PREFIX + "outbox"
EXEMPTIONS = PREFIX + "exemptions"
EXEMPTION_SEQUENCE = PREFIX + "exemption-seq"
ACCOUNTS = PREFIX + "accounts"
NOTICE_SEQUENCE = PREFIX + "notice-seq"
QUARANTINE = PREFIX + "quarantine"
QUARANTINE_SEQUENCE = PREFIX + "quarantine-seq"
PREFERENCES = PREFIX + "preferences"
DIGEST_MARK = PREFIX + "digest-mark"
RELEASING = PREFIX + "releasing"

#: Audit entries kept: admin actions are a few a day, so this is years of
#: history, while the list stays bounded in memory.
AUDIT_CAP = 100_000

#: Connections to Redis per process.  Redis runs commands one at a time, so
#: more connections would not answer sooner; operations beyond this many wait
#: for a free connection (within their deadline) instead of failing.
CONNECTIONS = 32

#: Most recipients counted in one pipeline.
ADMIT_BATCH = 256

#: A recipient waiting for its pipeline: account, script keys and arguments, its answer.
PendingAdmit = tuple[str, list[str], list[Any], Deferred[Admission]]

#: Errors of reading a reply that is not what our scripts return.
UNREADABLE = (ValueError, TypeError, KeyError, IndexError)

#: Accounts handled by one prune script: bounds how long one script holds
#: Redis (which runs scripts one at a time) when many accounts are active.
PRUNE_BATCH = 200

BLOCK_FIELDS = ("since", "until", "reason", "count", "clients", "by")


def window_key(account: str) -> str:
    """The sorted set of an account's counted recipients."""
    return f"{PREFIX}window:{account}"


def instance_key(account: str, instance: str) -> str:
    """The recipients counted for one transaction of an account (for give-back)."""
    # The length keeps ("a:b", "c") and ("a", "b:c") apart.
    return f"{PREFIX}instance:{len(account)}:{account}:{instance}"


def block_key(account: str) -> str:
    """The hash of an account's block."""
    return f"{PREFIX}block:{account}"


# --- Lua ----------------------------------------------------------------------
#
# Numbers from Python travel as strings (repr of a float is exact) and are
# handed to Redis unchanged: Lua would print them with 14 digits only.

PRELUDE = """
local function split(member)
  local a = string.find(member, '|', 1, true)
  local b = string.find(member, '|', a + 1, true)
  local n = tonumber(string.sub(member, a + 1, b - 1))
  return string.sub(member, b + 1, b + n), string.sub(member, b + n + 1)
end
"""

#: KEYS: window, block, sequence, active, blocks, instance, outbox, notice sequence.
#: ARGV: now, cutoff, limit, until, reason, instance, client, window ms,
#: block ms, max clients, account, then the addresses to notify of a block.
ADMIT = (
    PRELUDE
    + """
local block = redis.call('HMGET', KEYS[2], 'since', 'until', 'reason', 'count', 'clients', 'by')
if block[1] then
  if tonumber(block[2]) > tonumber(ARGV[1]) then
    return {'blocked', block[1], block[2], block[3], block[4], block[5], block[6]}
  end
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[5], ARGV[11])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
local count = redis.call('ZCARD', KEYS[1])
if count < tonumber(ARGV[3]) then
  local seq = redis.call('INCR', KEYS[3])
  local member = string.format('%016x', seq) .. '|' .. #ARGV[6] .. '|' .. ARGV[6] .. ARGV[7]
  redis.call('ZADD', KEYS[1], ARGV[1], member)
  redis.call('PEXPIRE', KEYS[1], ARGV[8])
  redis.call('SADD', KEYS[6], member)
  redis.call('PEXPIRE', KEYS[6], ARGV[8])
  redis.call('ZADD', KEYS[4], 'GT', ARGV[1], ARGV[11])
  redis.call('PEXPIRE', KEYS[4], ARGV[8])
  return {'allowed', count + 1}
end
local seen, clients = {}, {}
for _, member in ipairs(redis.call('ZREVRANGE', KEYS[1], 0, -1)) do
  local _, client = split(member)
  if client ~= '' and not seen[client] then
    seen[client] = true
    clients[#clients + 1] = cjson.encode(client)
    if #clients >= tonumber(ARGV[10]) then break end
  end
end
local listed = '[' .. table.concat(clients, ',') .. ']'
redis.call('HSET', KEYS[2], 'since', ARGV[1], 'until', ARGV[4], 'reason', ARGV[5],
           'count', count, 'clients', listed, 'by', 'policyd')
redis.call('PEXPIRE', KEYS[2], ARGV[9])
redis.call('ZADD', KEYS[5], ARGV[1], ARGV[11])
local payload = '{"account":' .. cjson.encode(ARGV[11]) .. ',"since":' .. ARGV[1] ..
  ',"until":' .. ARGV[4] .. ',"reason":' .. cjson.encode(ARGV[5]) .. ',"count":' .. count ..
  ',"clients":' .. listed .. ',"by":"policyd"}'
for i = 12, #ARGV do
  local id = redis.call('INCR', KEYS[8])
  redis.call('HSET', KEYS[7] .. ':' .. id, 'kind', 'block', 'recipient', ARGV[i],
             'payload', payload, 'created', ARGV[1], 'attempts', 0, 'last_error', '')
  redis.call('ZADD', KEYS[7], ARGV[1], id)
end
return {'newly-blocked', ARGV[1], ARGV[4], ARGV[5], count, listed, 'policyd'}
"""
)

#: KEYS: outbox.  ARGV: now, lease end, limit.
CLAIM = """
local claimed = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])) do
  local key = KEYS[1] .. ':' .. id
  redis.call('ZADD', KEYS[1], ARGV[2], id)
  redis.call('HINCRBY', key, 'attempts', 1)
  local fields = redis.call('HMGET', key, 'kind', 'recipient', 'payload', 'created', 'attempts', 'last_error')
  claimed[#claimed + 1] = {id, fields[1], fields[2], fields[3], fields[4], fields[5], fields[6]}
end
return claimed
"""

#: KEYS: outbox.  ARGV: id, retry time, error.
FAILED = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
  redis.call('HSET', KEYS[1] .. ':' .. ARGV[1], 'last_error', ARGV[3])
end
return 1
"""

#: KEYS: digest mark, outbox, notice sequence.  ARGV: mark expected ('' for none),
#: new mark, then recipient and JSON payload of each digest.
QUEUE_DIGEST = """
local current = redis.call('GET', KEYS[1]) or ''
if current ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2])
for i = 3, #ARGV, 2 do
  local id = redis.call('INCR', KEYS[3])
  redis.call('HSET', KEYS[2] .. ':' .. id, 'kind', 'digest', 'recipient', ARGV[i],
             'payload', ARGV[i + 1], 'created', ARGV[2], 'attempts', 0, 'last_error', '')
  redis.call('ZADD', KEYS[2], ARGV[2], id)
end
return 1
"""

#: KEYS: release claim.  ARGV: now, claim end, lifetime in ms.  The end is
#: compared with the caller's now (fake clocks in tests); the lifetime only
#: lets Redis forget the key.
CLAIM_RELEASE = """
local until_ = redis.call('GET', KEYS[1])
if until_ and tonumber(until_) > tonumber(ARGV[1]) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""

#: KEYS: window, instance.
GIVE_BACK = """
local given = 0
for _, member in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  given = given + redis.call('ZREM', KEYS[1], member)
end
redis.call('DEL', KEYS[2])
return given
"""

#: KEYS: block, blocks.  ARGV: since, until, reason, count, clients, by, ms, account.
PUT_BLOCK = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'since', ARGV[1], 'until', ARGV[2], 'reason', ARGV[3],
           'count', ARGV[4], 'clients', ARGV[5], 'by', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[8])
return 1
"""

#: KEYS: block, window, active, blocks.  ARGV: now, account.
UNBLOCK = """
local block = redis.call('HMGET', KEYS[1], 'since', 'until', 'reason', 'count', 'clients', 'by')
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('ZREM', KEYS[4], ARGV[2])
if block[1] and tonumber(block[2]) > tonumber(ARGV[1]) then
  return block
end
return {}
"""

#: KEYS: active, then windows.  ARGV: cutoff, then the windows' accounts.
PRUNE_WINDOWS = """
local removed = 0
for i = 2, #KEYS do
  removed = removed + redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', ARGV[1])
  if redis.call('EXISTS', KEYS[i]) == 0 then
    redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return removed
"""

#: KEYS: blocks, then block keys.  ARGV: now, then the blocks' accounts.
PRUNE_BLOCKS = """
for i = 2, #KEYS do
  local until_ = redis.call('HGET', KEYS[i], 'until')
  if not until_ or tonumber(until_) <= tonumber(ARGV[1]) then
    redis.call('DEL', KEYS[i])
    redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return 1
"""
