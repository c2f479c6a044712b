"""Redis keys, limits and the Lua scripts that make each read-check-write atomic."""

from __future__ import annotations

from twisted.internet.defer import Deferred

from policyd.store import Admission, Charge

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

#: Most recipients counted in one script call: bounds how long it holds Redis.
ADMIT_BATCH = 256

#: Recipients after which a turn's batch is sent at once, before the turn
#: ends: with 50 busy clients a turn reads 50 requests, and one call for all
#: of them had Redis idle while they were read and the server idle while
#: Redis counted (16: 10-15% more requests a second than per turn in the bench).
ADMIT_EARLY = 16

#: A recipient waiting for its batch: what to count, and its answer.
PendingAdmit = tuple[Charge, Deferred[Admission]]

#: Errors of reading a reply that is not what our scripts return.
UNREADABLE = (ValueError, TypeError, KeyError, IndexError)

#: Accounts handled by one prune script: bounds how long one script holds
#: Redis (which runs scripts one at a time) when many accounts are active.
PRUNE_BATCH = 200

BLOCK_FIELDS = ("since", "until", "reason", "count", "clients", "by")


#: Where an account's window, block and instance keys start (the admit script names them too).
WINDOW_KEYS = PREFIX + "window:"
BLOCK_KEYS = PREFIX + "block:"
INSTANCE_KEYS = PREFIX + "instance:"


def window_key(account: str) -> str:
    """The sorted set of an account's counted recipients."""
    return WINDOW_KEYS + account


def instance_key(account: str, instance: str) -> str:
    """The recipients counted for one transaction of an account (for give-back)."""
    # The length keeps ("a:b", "c") and ("a", "b:c") apart; in bytes, as the admit script counts it.
    return f"{INSTANCE_KEYS}{len(account.encode('utf-8', 'surrogateescape'))}:{account}:{instance}"


def block_key(account: str) -> str:
    """The hash of an account's block."""
    return BLOCK_KEYS + account


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

#: Keys every admission of a batch shares, in the order of the admit script's KEYS.
ADMIT_SHARED = (SEQUENCE, ACTIVE, BLOCKS, OUTBOX, NOTICE_SEQUENCE)

#: Counts a batch of recipients, in order, atomically: the recipients a
#: process counts in one turn of its event loop are one script call.
#:
#: KEYS: sequence, active, blocks, outbox, notice sequence.  ARGV: max
#: clients, window and block length in seconds and in milliseconds, the
#: number of recipients, then for each recipient: account, instance, client,
#: now, limit, reason ('' when it is the recipient before's, else '=' and the
#: reason), the number of addresses to notify of a block, and those addresses.
#:
#: An account's window, block and instance keys are named here from the
#: account rather than passed as KEYS: a batch spans many accounts (so it
#: could not run on a Redis Cluster anyway), and packing three keys a
#: recipient cost policyd more than the rest of its work on the recipient.
#: The times worked out here (the window's start, a block's end) are written
#: with 17 digits, which gives back the same double; Lua's own tostring keeps 14.
#:
#: Each recipient gets its own reply: the count when allowed, blocked or
#: newly-blocked and the block, or error and why (a key of ours holding
#: something else fails its own recipient only).
ADMIT = (
    PRELUDE
    + f"""
local WINDOW_KEYS, BLOCK_KEYS, INSTANCE_KEYS = '{WINDOW_KEYS}', '{BLOCK_KEYS}', '{INSTANCE_KEYS}'
"""
    + """
local max_clients = tonumber(ARGV[1])
local window, block_for = tonumber(ARGV[2]), tonumber(ARGV[3])
local window_ms, block_ms = ARGV[4], ARGV[5]
local recipients = tonumber(ARGV[6])
-- One sequence number per recipient of the batch, taken at once.
local seq = redis.call('INCRBY', KEYS[1], recipients) - recipients
local counted = false
local reason = ''

local function exact(number)
  return string.format('%.17g', number)
end

local function admit(a, notify)
  local account, id, client, now = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local window_key = WINDOW_KEYS .. account
  local block_key = BLOCK_KEYS .. account
  local block = redis.call('HMGET', block_key, 'since', 'until', 'reason', 'count', 'clients', 'by')
  if block[1] then
    if tonumber(block[2]) > tonumber(now) then
      return {'blocked', block[1], block[2], block[3], block[4], block[5], block[6]}
    end
    redis.call('DEL', block_key)
    redis.call('ZREM', KEYS[3], account)
  end
  redis.call('ZREMRANGEBYSCORE', window_key, '-inf', exact(tonumber(now) - window))
  local count = redis.call('ZCARD', window_key)
  if count < tonumber(ARGV[a + 4]) then
    seq = seq + 1
    local member = string.format('%016x', seq) .. '|' .. #id .. '|' .. id .. client
    local instance = INSTANCE_KEYS .. #account .. ':' .. account .. ':' .. id
    redis.call('ZADD', window_key, now, member)
    redis.call('PEXPIRE', window_key, window_ms)
    redis.call('SADD', instance, member)
    redis.call('PEXPIRE', instance, window_ms)
    redis.call('ZADD', KEYS[2], 'GT', now, account)
    counted = true
    return count + 1
  end
  local seen, clients = {}, {}
  for _, member in ipairs(redis.call('ZREVRANGE', window_key, 0, -1)) do
    local _, member_client = split(member)
    if member_client ~= '' and not seen[member_client] then
      seen[member_client] = true
      clients[#clients + 1] = cjson.encode(member_client)
      if #clients >= max_clients then break end
    end
  end
  local listed = '[' .. table.concat(clients, ',') .. ']'
  local until_ = exact(tonumber(now) + block_for)
  redis.call('HSET', block_key, 'since', now, 'until', until_, 'reason', reason,
             'count', count, 'clients', listed, 'by', 'policyd')
  redis.call('PEXPIRE', block_key, block_ms)
  redis.call('ZADD', KEYS[3], now, account)
  local payload = '{"account":' .. cjson.encode(account) .. ',"since":' .. now ..
    ',"until":' .. until_ .. ',"reason":' .. cjson.encode(reason) .. ',"count":' .. count ..
    ',"clients":' .. listed .. ',"by":"policyd"}'
  for i = a + 7, a + 6 + notify do
    local id = redis.call('INCR', KEYS[5])
    redis.call('HSET', KEYS[4] .. ':' .. id, 'kind', 'block', 'recipient', ARGV[i],
               'payload', payload, 'created', now, 'attempts', 0, 'last_error', '')
    redis.call('ZADD', KEYS[4], now, id)
  end
  return {'newly-blocked', now, until_, reason, count, listed, 'policyd'}
end

local replies, a = {}, 7
for _ = 1, recipients do
  local given = ARGV[a + 5]
  if given ~= '' then
    reason = string.sub(given, 2)
  end
  local notify = tonumber(ARGV[a + 6])
  local ok, reply = pcall(admit, a, notify)
  if not ok then
    if type(reply) == 'table' then reply = reply.err or reply.msg end
    reply = {'error', tostring(reply)}
  end
  replies[#replies + 1] = reply
  a = a + 7 + notify
end
if counted then
  redis.call('PEXPIRE', KEYS[2], window_ms)
end
return replies
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
