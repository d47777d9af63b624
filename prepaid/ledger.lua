-- The credit ledger: every balance change of one account in one atomic step.
-- KEYS: 1 account hash, 2 holds hash, 3 history stream, 4 the unbucketed idempotency hash
-- of older releases (read until it expires), 5 the account's outbox stream, 6 today's
-- idempotency bucket (written), 7... the earlier buckets of the retry window (read); all in
-- the account's hash tag, so the script touches one cluster slot
-- ARGV: 1 op, 2 idempotency key, 3 amount (micro-units), 4 reference, 5 hold id, 6 flags,
-- 7 operator and 8 reason (of a correction: adjust, refund, reverse; else empty), 9 seconds
-- today's bucket lives after its last write (the window and one bucket)
-- Reply: {status, balance, held, history entry id, crossed (0/1), hold amount}
-- status is OK, DUP (same key seen: the first result is returned) or an error code.
local acct, holds, hist, idem, outbox = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local op, key, ref, hold, flags = ARGV[1], ARGV[2], ARGV[4], ARGV[5], ARGV[6]
local amount = tonumber(ARGV[3])
local LIMIT = 9000000000000000  -- stay inside the exact range of Lua's doubles

local function fmt(n) return string.format('%d', n) end

if redis.call('EXISTS', acct) == 0 then
  return {'NO_ACCOUNT', 0, 0, '', 0, 0}
end
local balance = tonumber(redis.call('HGET', acct, 'balance'))
local held = tonumber(redis.call('HGET', acct, 'held'))

-- Redis 7.0 has no per-field expiry: keys live in one hash per day (a bucket), each
-- expiring after the window, and a key is looked for in every bucket of the window.
local bucket = KEYS[6] or idem
-- a refund or a reverse undoes its top-up or call once, and an admin's top-up (key
-- topup:<reference>) credits once, however late it is retried: their keys are kept for
-- good, in the account's own hash (few: each is an admin's act)
local forever = op == 'refund' or op == 'reverse' or string.sub(key, 1, 6) == 'topup:'
if key ~= '' then
  local prev = nil
  for i = 6, #KEYS do
    prev = redis.call('HGET', KEYS[i], key)
    if prev then break end
  end
  if not prev then prev = redis.call('HGET', idem, key) end
  if not prev and forever then
    prev = redis.call('HGET', acct, 'once:' .. key)
  end
  if prev then
    local f = {}
    for part in string.gmatch(prev, '([^|]*)|?') do table.insert(f, part) end
    if f[1] ~= op or f[2] ~= ARGV[3] then
      return {'IDEM_CONFLICT', balance, held, '', 0, 0}
    end
    return {'DUP', tonumber(f[3]), tonumber(f[4]), f[5], tonumber(f[6]), tonumber(f[7])}
  end
end

-- adjust alone is signed (a correction either way); every other amount is a magnitude
if amount == nil or (amount < 0 and op ~= 'adjust') or math.abs(amount) > LIMIT then
  return {'BAD_AMOUNT', balance, held, '', 0, 0}
end

local old_balance = balance
local hold_amount = 0
local delta = 0

if op == 'credit' then
  if amount <= 0 then return {'BAD_AMOUNT', balance, held, '', 0, 0} end
  if balance + amount > LIMIT then return {'OVERFLOW', balance, held, '', 0, 0} end
  delta = amount
elseif op == 'debit' then
  if amount <= 0 then return {'BAD_AMOUNT', balance, held, '', 0, 0} end
  if flags ~= 'force' and balance - held < amount then
    return {'NO_CREDIT', balance, held, '', 0, 0}
  end
  delta = -amount
elseif op == 'reserve' then
  -- 0 is a free destination's hold: recorded like any other, so metering finds the call
  if redis.call('HGET', acct, 'status') ~= 'active' then
    return {'SUSPENDED', balance, held, '', 0, 0}
  end
  if redis.call('HEXISTS', holds, hold) == 1 then
    return {'HOLD_EXISTS', balance, held, '', 0, 0}
  end
  if balance - held < amount then return {'NO_CREDIT', balance, held, '', 0, 0} end
  redis.call('HSET', holds, hold, fmt(amount))
  held = held + amount
  hold_amount = amount
elseif op == 'settle' or op == 'release' then
  local h = redis.call('HGET', holds, hold)
  if h then hold_amount = tonumber(h) end
  if op == 'release' and not h then return {'NO_HOLD', balance, held, '', 0, 0} end
  if op == 'settle' and amount > 0 then
    if flags ~= 'force' and balance - (held - hold_amount) < amount then
      return {'NO_CREDIT', balance, held, '', 0, 0}
    end
    delta = -amount
  end
  if h then
    redis.call('HDEL', holds, hold)
    held = held - hold_amount
  end
elseif op == 'adjust' or op == 'refund' or op == 'reverse' then
  -- corrections (prepaid/corrections.py): a refund takes a top-up back, a reverse gives
  -- a call's charge back; only --force lets one take the balance below zero
  if amount == 0 then return {'BAD_AMOUNT', balance, held, '', 0, 0} end
  delta = amount
  if op == 'refund' then delta = -amount end
  if delta > 0 and balance + delta > LIMIT then return {'OVERFLOW', balance, held, '', 0, 0} end
  if delta < 0 and flags ~= 'force' and balance + delta < 0 then
    return {'BELOW_ZERO', balance, held, '', 0, 0}
  end
else
  return {'BAD_OP', balance, held, '', 0, 0}
end

balance = balance + delta
redis.call('HSET', acct, 'balance', fmt(balance), 'held', fmt(held))

local fields = {'kind', op, 'amount', fmt(delta), 'balance', fmt(balance), 'held', fmt(held),
  'ref', ref, 'hold', hold, 'key', key}
if ARGV[7] and ARGV[7] ~= '' then
  table.insert(fields, 'operator'); table.insert(fields, ARGV[7])
  table.insert(fields, 'reason'); table.insert(fields, ARGV[8] or '')
end
local entry = redis.call('XADD', hist, '*', unpack(fields))

-- Threshold crossing: only the change that takes the balance from at-or-above the
-- threshold to below it emits an event, so concurrent debits yield exactly one.  It goes
-- to the account's own outbox; the client forwards it to the shared policy outbox and
-- deletes it here (the policy worker's sweep forwards what a dead client left behind).
local crossed = 0
if delta < 0 then
  local p = redis.call('HMGET', acct, 'threshold', 'action', 'policy_enabled', 'topup_amount')
  local threshold = tonumber(p[1] or '0') or 0
  if p[2] and p[2] ~= 'none' and p[3] == '1' and threshold > 0
      and old_balance >= threshold and balance < threshold then
    crossed = 1
    redis.call('XADD', outbox, '*', 'account', redis.call('HGET', acct, 'id'),
      'crossing', entry, 'action', p[2], 'balance', fmt(balance),
      'threshold', fmt(threshold), 'topup_amount', p[4] or '0')
  end
end

if key ~= '' then
  local done = table.concat({op, ARGV[3], fmt(balance), fmt(held), entry, tostring(crossed),
    fmt(hold_amount)}, '|')
  redis.call('HSET', bucket, key, done)
  if forever then redis.call('HSET', acct, 'once:' .. key, done) end
  if ARGV[9] then
    redis.call('EXPIRE', bucket, ARGV[9])
    -- the unbucketed hash of an older release ages out with the window too
    if redis.call('TTL', idem) == -1 then redis.call('EXPIRE', idem, ARGV[9]) end
  end
end
return {'OK', balance, held, entry, crossed, hold_amount}
