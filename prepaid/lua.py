"""Every Lua script the project sends to Redis, in one place (as arq keeps its lua.py).

Each script touches the keys of one cluster slot (the key names are in prepaid/keys.py), so
it runs alike on a single Redis, through Sentinel and on a Cluster: scripts, not MULTI.
They are run with ``client.register_script(SCRIPT)(keys=..., args=...)`` (EVALSHA, EVAL
when the server does not know it yet).
"""

from __future__ import annotations

from importlib import resources

# -- the ledger (prepaid/ledger.py) --------------------------------------------------------
# Every balance change: one script, kept in its own file (prepaid/ledger.lua) for its size.
LEDGER = resources.files("prepaid").joinpath("ledger.lua").read_text()
# A new account with a zero balance and its first history entry.
CREATE_ACCOUNT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'currency', ARGV[2], 'email', ARGV[3],
  'status', 'active', 'balance', '0', 'held', '0', 'created', ARGV[4],
  'threshold', ARGV[5], 'action', ARGV[6], 'topup_amount', ARGV[7], 'policy_enabled', ARGV[8],
  'plan', ARGV[9])
redis.call('XADD', KEYS[2], '*', 'kind', 'open', 'amount', '0', 'balance', '0', 'held', '0',
  'ref', 'account created', 'hold', '', 'key', '')
return 1
"""
# Fields an admin may change without touching money, on an existing account.
UPDATE_ACCOUNT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""
# Suspend or resume (prepaid account suspend/resume): a closed account stays closed.
SET_STATUS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'NO_ACCOUNT' end
if redis.call('HGET', KEYS[1], 'status') == 'closed' then return 'CLOSED' end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'status_reason', ARGV[2], 'status_at', ARGV[3])
return 'OK'
"""
# Close an account for good (prepaid account close): only at a zero balance and without
# live calls' holds unless forced; the keys stay (the id is never reused), with a history
# entry of kind close.  KEYS: account, holds, history.  ARGV: force, operator, reason, time.
CLOSE_ACCOUNT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'NO_ACCOUNT', 0} end
if redis.call('HGET', KEYS[1], 'status') == 'closed' then return {'CLOSED', 0} end
local balance = redis.call('HGET', KEYS[1], 'balance')
local held = redis.call('HGET', KEYS[1], 'held')
local live = redis.call('HLEN', KEYS[2])
if ARGV[1] ~= 'force' then
  if tonumber(balance) ~= 0 then return {'BALANCE', balance} end
  if live > 0 then return {'LIVE', live} end
end
redis.call('HSET', KEYS[1], 'status', 'closed', 'status_reason', ARGV[3], 'status_at', ARGV[4],
  'closed', ARGV[4])
redis.call('XADD', KEYS[3], '*', 'kind', 'close', 'amount', '0', 'balance', balance,
  'held', held, 'ref', 'account closed', 'hold', '', 'key', '', 'operator', ARGV[2],
  'reason', ARGV[3])
return {'OK', 0}
"""

# -- the rate deck (prepaid/ratestore.py) ----------------------------------------------------
# A new version number above both the counter and the active version (decks imported by
# an older release counted in the version key alone).
NEXT_RATES_VERSION = """
local n = redis.call('INCR', KEYS[1])
local v = tonumber(redis.call('GET', KEYS[2]) or '0')
if n <= v then n = v + 1; redis.call('SET', KEYS[1], n) end
return n
"""
# Make the staged deck its plan's active one and note the plan's currency in the plans hash;
# returns the version it replaced (to delete).
SWAP_RATES = """
if redis.call('HEXISTS', KEYS[1], '') == 0 then return false end
redis.call('PERSIST', KEYS[1])
local old = redis.call('GET', KEYS[2]) or '0'
redis.call('SET', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
return old
"""

# -- the metering heartbeat (prepaid/health.py): Redis' own clock, for every server alike ---
METER_BEAT = """
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'backlog', ARGV[2],
           'at', string.format('%d.%06d', t[1], t[2]))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
METER_READ = """
local t = redis.call('TIME')
return {t[1], t[2], redis.call('HGETALL', KEYS[1])}
"""

# -- the live-call record (prepaid/callrecord.py) --------------------------------------------
# A record is written once: a live call's record (and so the hold it names) is never
# replaced by another authorization reusing its uniqueid.
CALL_WRITE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.call('HMGET', KEYS[1], 'account', 'state')
end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""
CALL_STATE = """
redis.call('HSET', KEYS[1], 'state', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""
# A finished call is written in three steps of one cluster slot each, every one safe to
# repeat, so a crash between them loses nothing and doubles nothing (ami_listener/meter.py):
# 1. the call record keeps the first finisher's settlement (the call record's slot);
CALL_FINISH = """
redis.call('HSETNX', KEYS[1], 'finished', ARGV[1])
redis.call('HSETNX', KEYS[1], 'settlement', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return redis.call('HGET', KEYS[1], 'settlement')
"""
# 2. the account's call history logs that settlement once per reference (the account's);
CALLS_LOG = """
if redis.call('ZADD', KEYS[2], 'NX', ARGV[2], ARGV[1]) == 0 then return 0 end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 4))
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -2 * tonumber(ARGV[3]) - 1)
return 1
"""
# 3. the call record is marked ended.  Recovery completes a record left 'finished' but
#    not 'ended' by a crash (see Meter.recover).
CALL_ENDED = """
redis.call('HSET', KEYS[1], 'state', 'ended', 'logged', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""

# -- authorization outcomes (prepaid/outcomes.py) ------------------------------------------
# Log one outcome in the account's stream, capped by count (MAXLEN ~) and by age (MINID ~,
# the key's expiry for an account that stops calling); an account that does not exist
# gets nothing (0: the caller logs it in the shared stream of unknown accounts instead).
# KEYS: 1 the stream, 2 (optional) the account's hash, which must exist.
# ARGV: 1 max entries, 2 max age (ms), then field, value pairs.
OUTCOME_LOG = """
if KEYS[2] and redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
local t = redis.call('TIME')
local oldest = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[2])
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 3))
if oldest > 0 then redis.call('XTRIM', KEYS[1], 'MINID', '~', oldest) end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# -- automatic top-ups (policy/worker.py) ------------------------------------------------------
# Take the account's top-up lock, or take it again with the same token: an attempt cut
# short by a Redis outage (its unlock failed too) must not block its own retry.
TOPUP_LOCK = """
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""
# Give it back only if it is still ours.
TOPUP_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# -- the mail queue (policy/mailer.py) ---------------------------------------------------------
# Queue a mail once under its id: its record and the stream entry together.
MAIL_ENQUEUE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'state', 'queued', 'to', ARGV[2], 'queued', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('XADD', KEYS[2], '*', 'id', ARGV[1], 'to', ARGV[2], 'message', ARGV[3])
return 1
"""

# -- self-service PINs (prepaid/pins.py) --------------------------------------------------------
# Count an attempt before the PIN is checked, so parallel guesses are counted too: returns
# -ttl while locked out, else the attempts in this window (the caller clears them on success).
PIN_ATTEMPT = """
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n >= tonumber(ARGV[1]) then return -redis.call('TTL', KEYS[1]) end
n = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return n
"""

# -- the audit (prepaid/audit.py) -----------------------------------------------------------
# One account's balance, holds and last history entry read at one instant (its keys share
# a slot), so `prepaid verify` compares them without a race against live traffic.
AUDIT_SNAPSHOT = """
return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2]),
        redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)}
"""
