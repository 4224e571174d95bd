//! The Lua scripts. Each runs atomically in Redis and returns a flat reply (Spin's
//! `execute` flattens nested replies), whose first element says what happened.
//! Only fixed scripts are ever sent: user input travels as arguments.
//!
//! Scripts that change what happened to writes also count it, in the shard's
//! stats hash (see `Layout::stats`): totals per outcome, and accepted / applied
//! per 10-second bucket (`<field>@<bucket>`, the last minute kept) for throughput.

/// A script's SHA1, as Redis names it (`EVALSHA`, `SCRIPT LOAD`'s answer):
/// computed here, so that a new instance calls `EVALSHA` at once instead of
/// sending the script's text first (a round trip per script and instance;
/// on a platform with a fresh instance per request, per request).
pub fn sha1_hex(script: &str) -> String {
    use sha1::Digest as _;
    hex::encode(sha1::Sha1::digest(script.as_bytes()))
}

/// The first line of the scripts the processor drains the queue with: they run
/// even when Redis is at its `maxmemory` (policy `noeviction`), where Redis
/// refuses a script's first command that may grow memory. Applying the queue
/// is what frees memory (acknowledged entries are deleted): a processor whose
/// lease or read were refused would leave a full Redis full for good. Intake's
/// `ENQUEUE` and replays do not have it: they are refused, as they must be.
macro_rules! allow_oom {
    () => {
        "#!lua flags=allow-oom\n"
    };
}

/// The Lua counting helper the scripts share: `count(stats_key, field, n,
/// windowed)`, `windowed` being false, true (Redis's clock read here) or the
/// time in ms the caller read already.
macro_rules! count_lua {
    () => {
        r#"
local function count(key, field, n, windowed)
  if n <= 0 then return end
  redis.call('HINCRBY', key, field, n)
  if not windowed then return end
  local secs
  if type(windowed) == 'number' then
    secs = windowed / 1000
  else
    secs = tonumber(redis.call('TIME')[1])
  end
  local b = math.floor(secs / 10)
  -- A new bucket (once per 10 s) drops the ones older than the window.
  if redis.call('HINCRBY', key, field .. '@' .. b, n) == n then
    for _, f in ipairs(redis.call('HKEYS', key)) do
      local at = string.match(f, '@(%d+)$')
      if at and tonumber(at) < b - 6 then redis.call('HDEL', key, f) end
    end
  end
end
"#
    };
}

/// The Lua helper that settles a tenant's writes:
/// `settle(tenants_hash, tenant, n)` takes `n` from the tenant's count of
/// writes accepted and not yet settled (see `Layout::tenants`), and drops the
/// field at zero, so the hash holds only tenants with writes in flight and
/// their counters.
macro_rules! tenant_lua {
    () => {
        r#"
local function settle(hash, tenant, n)
  if tenant == nil or tenant == '' or n <= 0 then return end
  if redis.call('HINCRBY', hash, 'd:' .. tenant, -n) <= 0 then redis.call('HDEL', hash, 'd:' .. tenant) end
end
"#
    };
}

/// The Lua helper that adds a request's first entry to a shard's stream:
/// `add_entry(stream, payload, now_ms, seq_start, tenant)`, returning its id;
/// and `fields(payload, tenant)`, an entry's fields: the write (`w`) and, if
/// it has one, its tenant (`t`).
///
/// A write's id is its entry id, so two writes must never get the same one,
/// yet `XADD *` hands out ids from the server's clock and the stream's last id:
/// after a failover to a replica that lagged, whose clock is behind the old
/// primary's, it hands out again the ids of writes the old primary took
/// during the lag, which the database has recorded as applied (and the new
/// write would be skipped as a redelivery). So the sequence part starts at a
/// random number (`seq_start`, below 2^32) instead of 0 or the last one plus
/// one: `<now>-<seq_start>`, or, when the stream's last id is at or past `now`
/// (a burst within one millisecond, or that failover), that id plus one plus
/// `seq_start`. Two entries then share an id only if two random numbers agree.
macro_rules! add_entry_lua {
    () => {
        r#"
local function fields(payload, tenant)
  if tenant and tenant ~= '' then return 'w', payload, 't', tenant end
  return 'w', payload
end
local function add_entry(stream, payload, now, seq_start, tenant)
  local id = redis.pcall('XADD', stream, string.format('%d-%d', now, seq_start), fields(payload, tenant))
  if type(id) ~= 'table' then return id end
  if not string.find(id.err, 'equal or smaller', 1, true) then error(id) end
  local info = redis.call('XINFO', 'STREAM', stream)
  local last = '0-0'
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then last = info[i + 1] end
  end
  local ms, seq = string.match(last, '^(%d+)-(%d+)$')
  return redis.call('XADD', stream, ms .. '-' .. string.format('%.0f', tonumber(seq) + 1 + seq_start), fields(payload, tenant))
end
"#
    };
}

/// The Lua helpers of the schedule (see `crate::schedule`), after
/// `add_entry_lua`. A shard's schedule is a sorted set (`sched`) of 16-digit
/// sequences scored by due time, and a hash (`sched_w`) from each sequence to
/// its write (after its tenant's name, if it has one: a write is a JSON
/// object, so its first `{` ends the name), plus the field `#`: the count
/// of writes ever scheduled. A
/// sequence is that count (modulo 9e9) times a million plus a random number
/// below a million: unique in the shard, ordered by acceptance, and exact in
/// Lua's numbers (below 2^53). A scheduled write's stream id is
/// `<due ms>-<sequence>`.
///
/// - `schedule(sched, sched_w, at, payload, rand, tenant)` adds a write due
///   `at`; returns its entry id.
/// - `unpack_write(stored)`: a stored write's payload and tenant (`''`: none).
/// - `move_due(sched, sched_w, stream, now, max, retention_ms, seq_start)`
///   moves up to `max` scheduled writes due at or before `now` into the stream,
///   in order (due time, then acceptance), each under its id, and returns how
///   many it moved, whether more are due, and, when it moved none, the
///   schedule's next due time (`false`: it is empty; `nil` when it moved
///   some), which `arm` then need not read again. It reads the schedule's
///   first member before anything else: on a shard with nothing due, that
///   one read is all it does. Every script that adds to a
///   stream moves first, and adds its own entries at `now` (or the stream's
///   last millisecond, if later), so the stream's ids stay below those of the
///   writes still scheduled; only after a failover to a replica whose clock
///   was behind can the stream be past one: it then gets a new id, and its old
///   id's status key says `moved:<new entry id>`.
/// - `arm(sched, alarm, now, floor, lead, soonest)` sets the shard's alarm to expire
///   `lead` ms before its next scheduled write is due (not before `floor`),
///   unless it expires sooner already. A write due within the lead is the
///   business of a drain that waits for it (its caller rings, or holds the
///   shard): its alarm is a backstop, `lead` ms from now at the soonest, not
///   set again and again. Returns the ms until that write is due (-1: none)
///   and the alarm's TTL if it was set (-1: left as it was). `soonest` is the
///   schedule's next due time if the caller knows it (`false`: empty; `nil`:
///   read it here).
/// - `next_due(sched)`: the schedule's next due time, or `false` if it is empty.
/// - `seq_of(member)`: a sequence as it appears in the write id.
macro_rules! schedule_lua {
    () => {
        r#"
local function seq_of(member)
  return (string.gsub(member, '^0+', ''))
end
local function unpack_write(stored)
  local brace = string.find(stored, '{', 1, true) or 1
  return string.sub(stored, brace), string.sub(stored, 1, brace - 1)
end
local function schedule(sched, sched_w, at, payload, rand, tenant)
  local c = redis.call('HINCRBY', sched_w, '#', 1)
  local seq = string.format('%016.0f', (c % 9000000000) * 1000000 + rand % 1000000)
  redis.call('ZADD', sched, at, seq)
  redis.call('HSET', sched_w, seq, (tenant or '') .. payload)
  return string.format('%d', at) .. '-' .. seq_of(seq)
end
local function next_due(sched)
  local first = redis.call('ZRANGE', sched, 0, 0, 'WITHSCORES')
  if #first == 0 then return false end
  return tonumber(first[2])
end
local function move_due(sched, sched_w, stream, now, max, retention, seq_start)
  local soonest = next_due(sched)
  if not soonest or soonest > now then return 0, false, soonest end
  local due = redis.call('ZRANGEBYSCORE', sched, '-inf', now, 'WITHSCORES', 'LIMIT', 0, max)
  for i = 1, #due, 2 do
    local m = due[i]
    local payload, tenant = unpack_write(redis.call('HGET', sched_w, m) or '')
    local id = string.format('%d', tonumber(due[i + 1])) .. '-' .. seq_of(m)
    local added = redis.pcall('XADD', stream, id, fields(payload, tenant))
    if type(added) == 'table' then
      if not string.find(added.err, 'equal or smaller', 1, true) then error(added) end
      local new = add_entry(stream, payload, now, seq_start, tenant)
      redis.call('SET', string.gsub(stream, ':stream$', ':dead:') .. id, 'moved:' .. new, 'PX', retention)
    end
    redis.call('ZREM', sched, m)
    redis.call('HDEL', sched_w, m)
  end
  if #due < 2 * max then return #due / 2, false end
  return #due / 2, #redis.call('ZRANGEBYSCORE', sched, '-inf', now, 'LIMIT', 0, 1) > 0
end
local function arm(sched, alarm, now, floor, lead, soonest)
  if soonest == nil then soonest = next_due(sched) end
  if not soonest then return -1, -1 end
  local due = soonest
  if due - now <= lead then floor = math.max(floor, now + lead) end
  local at = math.max(floor, due - lead)
  local cur = tonumber(redis.call('GET', alarm) or '')
  if cur and cur <= at then return due - now, -1 end
  redis.call('SET', alarm, string.format('%d', at), 'PX', math.max(1, at - now))
  return due - now, math.max(1, at - now)
end
"#
    };
}

/// Enqueue a request's writes on one Redis server in one round trip, all or
/// nothing: the writes of every shard of the request that lives on that server
/// (of one shard, with `redis_cluster`, so that the script touches one hash slot).
///
/// KEYS: `[idempotency, (stream, bell, lease, stats, sched, sched_w, alarm)*,
/// tenants, bucket*]`, one group per shard, then the tenants' hash and each
/// tenant's token bucket (see `Layout::tenants`), in the idempotency key's slot.
/// ARGV: `[use_idem, body_md5, idem_ttl_s, depth_limit, bell_ttl_ms, seq_start,
/// scheduled_limit, lead_ms, retention_ms, past_ms, n, shard_1..shard_n, writes,
/// (slot, due, ttl, payload, tenant)*, tenants, (name, rate, burst, depth,
/// refused)*, answers, (type, count)*, channel]` where `slot` is 1-based in the shard
/// list, `tenant` is 1-based in the tenant list (0: none), each tenant's quota
/// is this call's share of it (0: no limit) and `refused` the requests of it
/// the caller refused on its own (counted as throttled here), `answers` the
/// error answers the caller gave without Redis (by problem type, counted in
/// the first shard's stats as `refused:<type>`, as a refusal for a full
/// queue or schedule is counted in its shard's), `channel` the doorbell
/// channel when this server is the Redis trigger's (the call publishes each
/// shard it rings there; empty: the caller rings them), `due`
/// is empty (now), `d<ms>` (a delay) or `a<epoch ms>` (a time: one past by up
/// to `past_ms` is now, one further back is refused, after the idempotency
/// record is looked up, so that a retry of an accepted request replays it),
/// `ttl` is empty or `<ttl_ms>:<the key as a JSON string>`, and `seq_start` is
/// random (see `add_entry_lua`): a request's first entry in each stream is
/// added by `add_entry`, the rest follow it.
///
/// Quotas: a tenant's writes must fit its depth (writes accepted and not yet
/// settled, an expiry counting as one) and its token bucket (one token per
/// write, refilled at `rate` per second up to `burst`). Checked before
/// anything is added; a refusal counts one throttled request of the tenant.
///
/// A write due later goes to the shard's schedule (see `schedule_lua`), with
/// the id it will have in the stream. What is due moves into the stream before
/// anything is added to it; a shard with more due than one call moves keeps
/// this call's writes in its schedule too, due now, behind the rest. A write
/// with a `ttl` schedules its expiry beside it, `ttl_ms` after it is due: the
/// write `{"key": .., "op": "$expire", "of": <its id>}`, which the processor
/// applies as a deletion unless a later write of the key was applied since.
///
/// Reply: `ok, id*[, rang, shard*][, armed, (shard, ttl_ms)*]`, an id being
/// `<write id>|<expiry's write id>` for a write with a `ttl` (`rang`: the
/// shards whose doorbell this call rang, or whose next scheduled write is due
/// within the alarm's lead; the caller rings them, on the doorbell channel or
/// over HTTP; `armed`: the shards whose alarm this call set, and when it
/// expires) | `replay, id*` (same idempotency key and body) | `conflict` (same
/// key, other body) | `full, shard` (over the depth limit) | `full-scheduled,
/// shard` (over the scheduled-write limit) | `past, i` (the call's `i`-th write,
/// 1-based, is due too far in the past) | `tenant-full, j, depth` (tenant `j`,
/// 1-based, holds `depth` writes) | `tenant-over-depth, j, depth` (the call has
/// more of its entries than its depth) | `tenant-rate, j, retry_ms,
/// tokens_milli` (its bucket has enough tokens in `retry_ms`; it holds
/// `tokens_milli` / 1000 now) | `tenant-burst, j, burst` (the call has more of
/// its writes than its bucket holds); nothing is added when refused. The
/// requests the caller refused on its own are counted first, whatever the
/// answer.
///
/// Doorbell: a shard whose flag is not set gets it (valued with the time it was
/// rung, with a TTL) and is rung, so a burst rings once per shard, not once per
/// write. A flag that has been set for more than half its TTL while no processor
/// holds the shard's lease is a ring that was lost (the processor crashed before
/// taking the lease, or the app restarted): it is rung again.
pub const ENQUEUE: &str = concat!(count_lua!(), add_entry_lua!(), schedule_lua!(), r#"
local n = tonumber(ARGV[11])
local base = 12 + n
local writes = tonumber(ARGV[base])
local tbase = base + 5 * writes + 1
local tenants, tkey = tonumber(ARGV[tbase]), KEYS[7 * n + 2]
local function tenant(j, k) return ARGV[tbase + 5 * j - 5 + k] end
-- The requests the caller refused on its own are counted whatever happens next.
for j = 1, tenants do
  local before = tonumber(tenant(j, 5))
  if before > 0 then redis.call('HINCRBY', tkey, 'x:' .. tenant(j, 1), before) end
end
local rbase = tbase + 5 * tenants + 1
local answers = tonumber(ARGV[rbase])
-- (Counts: redis.pcall, so that a Redis at maxmemory still gives the answer.)
for r = 1, answers do
  redis.pcall('HINCRBY', KEYS[5], 'refused:' .. ARGV[rbase + 2 * r - 1], ARGV[rbase + 2 * r])
end
-- The doorbell channel, when this server is the one the processor's Redis
-- trigger listens to: the call rings it itself (no round trip after).
local channel = ARGV[rbase + 2 * answers + 1]
local function ring(shard)
  if channel ~= '' then redis.call('PUBLISH', channel, shard) end
  return shard
end
local use_idem = ARGV[1] == '1'
if use_idem then
  local prev = redis.call('GET', KEYS[1])
  if prev then
    local sep = string.find(prev, '|', 1, true)
    if string.sub(prev, 1, sep - 1) ~= ARGV[2] then return {'conflict'} end
    -- A write that changes nothing: a WAIT for replicas after a replay then
    -- covers everything up to now, the first request's writes included.
    redis.call('SET', KEYS[1], prev, 'KEEPTTL')
    local out = {'replay'}
    for id in string.gmatch(string.sub(prev, sep + 1), '[^,]+') do out[#out + 1] = id end
    return out
  end
end
local limit, seq_start = tonumber(ARGV[4]), tonumber(ARGV[6])
local sched_limit, lead, retention, past = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local function key(s, i) return KEYS[7 * s - 6 + i] end
local function arg(i, k) return ARGV[base + 5 * i - 5 + k] end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, writes do
  local d = arg(i, 2)
  if string.sub(d, 1, 1) == 'a' and tonumber(string.sub(d, 2)) < now - past then return {'past', tostring(i)} end
end
local behind, moved, soonest = {}, {}, {}
for s = 1, n do moved[s], behind[s], soonest[s] = move_due(key(s, 5), key(s, 6), key(s, 1), now, 100, retention, seq_start) end
local due, queued, scheduled = {}, {}, {}
for i = 1, writes do
  local slot = tonumber(arg(i, 1))
  local d = arg(i, 2)
  local at = now
  if d ~= '' then
    local v = tonumber(string.sub(d, 2))
    if string.sub(d, 1, 1) == 'd' then at = now + v else at = math.max(now, v) end
  end
  due[i] = at
  if at > now then
    scheduled[slot] = (scheduled[slot] or 0) + 1
  else
    queued[slot] = (queued[slot] or 0) + 1
  end
  if arg(i, 3) ~= '' then scheduled[slot] = (scheduled[slot] or 0) + 1 end
end
-- Refused: nothing of the call is added, but what was moved is rung.
local function refused(kind, shard, ...)
  local out = {kind, shard}
  for _, extra in ipairs({...}) do out[#out + 1] = tostring(extra) end
  out[#out + 1] = 'rang'
  for s = 1, n do
    if moved[s] > 0 then out[#out + 1] = ring(ARGV[11 + s]) end
  end
  return out
end
-- Each tenant's writes (rate) and entries (depth: a write, and its expiry).
local asked, entries, tokens = {}, {}, {}
for i = 1, writes do
  local j = tonumber(arg(i, 5))
  if j > 0 then
    asked[j] = (asked[j] or 0) + 1
    entries[j] = (entries[j] or 0) + 1
    if arg(i, 3) ~= '' then entries[j] = entries[j] + 1 end
  end
end
for j = 1, tenants do
  local name, rate, burst, depth = tenant(j, 1), tonumber(tenant(j, 2)), tonumber(tenant(j, 3)), tonumber(tenant(j, 4))
  local function throttled(kind, ...)
    redis.call('HINCRBY', tkey, 'x:' .. name, 1)
    return refused(kind, tostring(j), ...)
  end
  if depth > 0 then
    if entries[j] > depth then return throttled('tenant-over-depth', depth) end
    local held = tonumber(redis.call('HGET', tkey, 'd:' .. name) or '0')
    if held + entries[j] > depth then return throttled('tenant-full', held) end
  end
  if rate > 0 then
    local v = redis.call('GET', KEYS[7 * n + 2 + j])
    local have = burst
    if v then
      local sep = string.find(v, ':', 1, true)
      have = math.min(burst, tonumber(string.sub(v, 1, sep - 1)) + math.max(0, now - tonumber(string.sub(v, sep + 1))) * rate / 1000)
    end
    if asked[j] > burst then return throttled('tenant-burst', burst) end
    if have < asked[j] then return throttled('tenant-rate', math.ceil((asked[j] - have) * 1000 / rate), math.floor(have * 1000)) end
    tokens[j] = have - asked[j]
  end
end
for s = 1, n do
  if redis.call('XLEN', key(s, 1)) + (queued[s] or 0) > limit then
    redis.pcall('HINCRBY', key(s, 4), 'refused:queue-full', 1)
    return refused('full', ARGV[11 + s])
  end
  if scheduled[s] and redis.call('ZCARD', key(s, 5)) + scheduled[s] > sched_limit then
    redis.pcall('HINCRBY', key(s, 4), 'refused:schedule-full', 1)
    return refused('full-scheduled', ARGV[11 + s])
  end
end
-- Accepted: the tenants are charged.
for j = 1, tenants do
  local name = tenant(j, 1)
  if tokens[j] then
    local rate, burst = tonumber(tenant(j, 2)), tonumber(tenant(j, 3))
    local full_in = math.ceil((burst - tokens[j]) * 1000 / rate)
    if full_in > 0 then
      -- Kept a minute past full (its refill is computed from its time, capped
      -- at the burst): a key that expired when full would, for a busy
      -- tenant, be an expired-key event, a processor invocation, per write.
      redis.call('SET', KEYS[7 * n + 2 + j], string.format('%.3f', tokens[j]) .. ':' .. now, 'PX', full_in + 60000)
    else
      redis.call('DEL', KEYS[7 * n + 2 + j])
    end
  end
  redis.call('HINCRBY', tkey, 'd:' .. name, entries[j])
  redis.call('HINCRBY', tkey, 'a:' .. name, asked[j])
end
local out = {'ok'}
-- A request's entries in one stream share a millisecond (its first entry's):
-- XADD's own clock runs on during a long script, and must not carry the
-- stream past a write scheduled for the next milliseconds.
local first_ms = {}
for i = 1, writes do
  local slot = tonumber(arg(i, 1))
  local stream, payload = key(slot, 1), arg(i, 4)
  local j = tonumber(arg(i, 5))
  local name = j > 0 and tenant(j, 1) or ''
  local prefix = ARGV[11 + slot] .. '-'
  local id
  if due[i] > now or behind[slot] then
    id = prefix .. schedule(key(slot, 5), key(slot, 6), due[i], payload, seq_start + i, name)
  elseif first_ms[slot] then
    id = prefix .. redis.call('XADD', stream, first_ms[slot] .. '-*', fields(payload, name))
  else
    local entry = add_entry(stream, payload, now, seq_start, name)
    first_ms[slot] = string.match(entry, '^(%d+)')
    id = prefix .. entry
  end
  local ttl = arg(i, 3)
  if ttl ~= '' then
    local sep = string.find(ttl, ':', 1, true)
    local expiry = '{"key":' .. string.sub(ttl, sep + 1) .. ',"op":"$expire","of":"' .. id .. '"}'
    id = id .. '|' .. prefix .. schedule(key(slot, 5), key(slot, 6), due[i] + tonumber(string.sub(ttl, 1, sep - 1)), expiry, seq_start + i, name)
  end
  out[#out + 1] = id
end
for s = 1, n do
  count(key(s, 4), 'accepted', (queued[s] or 0) + (scheduled[s] or 0), now)
  count(key(s, 4), 'scheduled', scheduled[s] or 0, false)
end
if use_idem then
  redis.call('SET', KEYS[1], ARGV[2] .. '|' .. table.concat(out, ',', 2), 'EX', ARGV[3])
end
local ttl = tonumber(ARGV[5])
local rang, armed = {}, {}
for s = 1, n do
  local rings = false
  if queued[s] or moved[s] > 0 then
    local bell = key(s, 2)
    -- Set if unset, else read (Redis >= 7.0: NX with GET): one command.
    local rung_at = redis.call('SET', bell, now, 'NX', 'GET', 'PX', ttl)
    rings = not rung_at
    if not rings then
      local at = tonumber(rung_at) or 0
      if now - at > ttl / 2 and redis.call('EXISTS', key(s, 3)) == 0 then
        redis.call('SET', bell, now, 'PX', ttl)
        rings = true
      end
    end
  end
  -- Every shard of the call with a schedule is armed (a lost alarm is set
  -- again here); one whose next write is due within the lead is rung too.
  -- The schedule's next due time as move_due read it, unless this call
  -- added to the schedule.
  local known
  if not scheduled[s] then known = soonest[s] end
  local due_in, set = arm(key(s, 5), key(s, 7), now, now + 1, lead, known)
  if scheduled[s] and due_in >= 0 and due_in <= lead then rings = true end
  if set > 0 then
    armed[#armed + 1] = ARGV[11 + s]
    armed[#armed + 1] = set
  end
  if rings then rang[#rang + 1] = ring(ARGV[11 + s]) end
end
if #rang > 0 then
  out[#out + 1] = 'rang'
  for _, s in ipairs(rang) do out[#out + 1] = s end
end
if #armed > 0 then
  out[#out + 1] = 'armed'
  for _, v in ipairs(armed) do out[#out + 1] = v end
end
return out
"#);

/// The Lua helper replay and purge share: `matching_dead(dead_key, first)` walks
/// the shard's dead-letter stream in order and returns `{entry id, fields}` of the
/// entries whose write id is among `ARGV[first..]` (all of them if none is given).
macro_rules! dead_lua {
    () => {
        r#"
local function matching_dead(key, first)
  local wanted, all = {}, #ARGV < first
  for i = first, #ARGV do wanted[ARGV[i]] = true end
  local found = {}
  for _, e in ipairs(redis.call('XRANGE', key, '-', '+')) do
    local f = {}
    for i = 1, #e[2], 2 do f[e[2][i]] = e[2][i + 1] end
    if all or wanted[f['id']] then found[#found + 1] = {e[1], f} end
  end
  return found
end
"#
    };
}

/// What a shard's lease holds while the shard backs off after a failed
/// batch (see [`LEASE_RELEASE`]); lease tokens are hex, so never this.
pub const BACKING_OFF: &str = "backoff";

/// Take a shard's lease. KEYS: `[lease, fence]`, ARGV: `[token, ttl_ms,
/// end_backoff]`. A shard backing off after a failed batch (its lease holds
/// [`BACKING_OFF`]) is taken only with `end_backoff` = `1` (an operator's
/// drain). Reply: the new fencing token (> 0), or 0 when someone else holds
/// the lease or the shard backs off.
pub const LEASE_ACQUIRE: &str = concat!(allow_oom!(), r#"
local held = redis.call('GET', KEYS[1])
if held == false or (ARGV[3] == '1' and held == 'backoff') then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return redis.call('INCR', KEYS[2])
end
return 0
"#);

/// Raise a shard's fencing counter to what the database has seen, if it is
/// below (Redis forgot tenures in a failover). KEYS: `[fence]`, ARGV:
/// `[at_least]`. Reply: 1 raised, 0 it was not below.
pub const FENCE_RAISE: &str = concat!(allow_oom!(), r#"
if (tonumber(redis.call('GET', KEYS[1])) or 0) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
  return 1
end
return 0
"#);

/// Release a lease we hold (compare-and-delete). Its watch is deleted too, or, after
/// a failed batch, kept to expire in `retry_ms`: that expiry event is the retry, so a
/// shard whose batch failed is tried again with no further traffic. With
/// `backoff_ms` > 0 the lease is not deleted but holds [`BACKING_OFF`] for
/// that long: no processor takes the shard (a doorbell, a scan) until it
/// expires, and its expiry event is the retry.
/// KEYS: `[lease, watch]`, ARGV: `[token, retry_ms, backoff_ms]` (0: no retry,
/// no backoff). Reply: 1 released, 0 not ours.
pub const LEASE_RELEASE: &str = concat!(allow_oom!(), r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  if tonumber(ARGV[2]) > 0 then
    redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  else
    redis.call('DEL', KEYS[2])
  end
  if tonumber(ARGV[3]) > 0 then
    redis.call('SET', KEYS[1], 'backoff', 'PX', ARGV[3])
    return 1
  end
  return redis.call('DEL', KEYS[1])
end
return 0
"#);

/// The doorbell handshake's last step, for shards found empty twice in a row
/// (see the processor's drain): per shard, as the holder of `token`, releases
/// its lease and drops its watch (done: as [`LEASE_RELEASE`] with no retry and
/// no backoff), then says whether its doorbell flag is set (a ring that found
/// the lease held: the shard is taken again). One call for all the shards of
/// a server (of one shard with `redis_cluster`). KEYS: `[(lease, watch,
/// bell)*]`. ARGV: `[token*]`. Reply: per shard, 1 if its flag is set, else 0.
pub const RELEASE_EMPTY: &str = concat!(allow_oom!(), r#"
local out = {}
for i = 1, #ARGV do
  if redis.call('GET', KEYS[3 * i - 2]) == ARGV[i] then
    redis.call('DEL', KEYS[3 * i - 1])
    redis.call('DEL', KEYS[3 * i - 2])
  end
  out[i] = redis.call('EXISTS', KEYS[3 * i])
end
return out
"#);

/// Read the next batch of a shard, as the lease holder, renewing the lease (and
/// setting the shard's watch to three lease TTLs). A tenure starts by resuming: it
/// reads the pending (delivered, unacknowledged) entries a previous holder left,
/// in order, from the cursor `resume` (`0` at first, then the last pending id read),
/// until none are left; only then new entries (`>`). Later in a tenure the pending
/// entries are the holder's own batches in flight, so it reads only new ones
/// (`resume` empty). Each delivery counts an attempt (a first delivery is
/// attempt 1 without a write; redeliveries are counted in the attempts hash). An
/// entry past the attempt limit is reported, not dropped: only the processor can
/// tell (from the database) whether an earlier delivery committed it, and a
/// committed write must be acknowledged, not dead-lettered (see [`DEAD_LETTER`]).
///
/// Blame: a round with a redelivered batch is applied carefully: every shard of
/// the round gets a marker ([`MARK_ROUND`]), each apply-step call names its
/// writes in its shard's marker first ([`MARK_CALL`]), and the markers go when
/// the calls are done. A marker still there when the entries are redelivered
/// means the previous delivery ended during those calls (a step that traps ends
/// the invocation): only the writes named in it are counted, with that error;
/// the shard's others are not. Once the pending entries are exhausted the
/// marker is dropped.
///
/// Schedule: up to `count` scheduled writes that are due move into the
/// stream first (see `schedule_lua`), and the shard's alarm is set for the
/// next one.
///
/// KEYS: `[lease, stream, attempts, watch, applying, sched, sched_w, alarm]`.
/// ARGV: `[token, group, consumer, count, max_attempts, lease_ttl_ms,
/// retention_ms, resume, bytes, lead_ms]`: at most `count` entries, and no more than fit
/// in `bytes` of payload (at least one; `0`: no limit). New entries are
/// measured before they are read (the group's last delivered id, then the
/// entries after it), so none is delivered that the batch does not carry;
/// pending ones are read, and those beyond stay pending, after the cursor.
/// Reply: `lost` | `ok, prune_before_ms, cursor, armed_ms, (entry_id, payload,
/// attempt, tenant)*`, where `armed_ms` is the TTL the shard's alarm was set
/// to (-1: left as it was), `tenant` is empty for a write of no tenant,
/// where `attempt` counts this delivery (above `max_attempts`: past the limit);
/// `cursor` is the last pending id read (resume from there next time) or empty
/// once the pending entries are exhausted and the batch holds new entries, and
/// `prune_before_ms` is the earlier of "now minus the retention" and the stream time
/// of the oldest entry still in the stream (see `sql::PRUNE_WRITES`), both on Redis's
/// clock, the clock of the entry ids.
pub const READ_BATCH: &str = concat!(allow_oom!(), add_entry_lua!(), schedule_lua!(), r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {'lost'} end
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('SET', KEYS[4], ARGV[1], 'PX', 3 * tonumber(ARGV[6]))
redis.pcall('XGROUP', 'CREATE', KEYS[2], ARGV[2], '0', 'MKSTREAM')
local count = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local _, more_due, soonest = move_due(KEYS[6], KEYS[7], KEYS[2], now, count, ARGV[7], tonumber(t[2]))
local budget = tonumber(ARGV[9]) or 0
local function read(from)
  local r = redis.call('XREADGROUP', 'GROUP', ARGV[2], ARGV[3], 'COUNT', count, 'STREAMS', KEYS[2], from)
  if not r then return {} end
  return r[1][2]
end
local has_marker = redis.call('EXISTS', KEYS[5]) == 1
local entries = {}
if ARGV[8] ~= '' then
  entries = read(ARGV[8])
  -- A careful round's batch (its marker set) is read whole: the marker names
  -- writes of it, and the next careful round's start drops the marker.
  if budget > 0 and not has_marker then
    local bytes, n = 0, 0
    for _, e in ipairs(entries) do
      if e[2] then bytes = bytes + #e[2][2] end
      if n > 0 and bytes > budget then break end
      n = n + 1
    end
    for i = #entries, n + 1, -1 do entries[i] = nil end
  end
end
local redelivered = #entries > 0
local cursor = ''
if redelivered then
  cursor = entries[#entries][1]
else
  redis.call('DEL', KEYS[5])
  if budget > 0 then
    local from = '0-0'
    for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[2])) do
      local name, id
      for i = 1, #g, 2 do
        if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then id = g[i + 1] end
      end
      if name == ARGV[2] then from = id end
    end
    -- Measured in small chunks: large entries stop the look early.
    local bytes, n = 0, 0
    while n < count do
      local want = math.min(64, count - n)
      local chunk = redis.call('XRANGE', KEYS[2], '(' .. from, '+', 'COUNT', want)
      for _, e in ipairs(chunk) do
        bytes = bytes + #e[2][2]
        if n > 0 and bytes > budget then want = -1 break end
        n = n + 1
      end
      if #chunk < want or want < 0 then break end
      from = chunk[#chunk][1]
    end
    count = math.max(1, n)
  end
  entries = read('>')
end
local marked = redelivered and has_marker
-- With more due than one read moves, the holder reads on: no alarm.
local armed = -1
if not more_due then _, armed = arm(KEYS[6], KEYS[8], now, now + 1, tonumber(ARGV[10]), soonest) end
local out = {'ok', 0, cursor, armed}
for _, e in ipairs(entries) do
  local id = e[1]
  local fields = e[2]
  if not fields then
    redis.call('XACK', KEYS[2], ARGV[2], id)
  else
    local n = 1
    if redelivered then
      if not marked or redis.call('SREM', KEYS[5], id) == 1 then
        n = redis.call('HINCRBY', KEYS[3], id, 1) + 1
        if marked then
          redis.call('HSET', KEYS[3], 'err:' .. id, 'the apply step trapped (or the processor stopped) while applying this write')
        end
      else
        n = tonumber(redis.call('HGET', KEYS[3], id) or '0') + 1
      end
    end
    out[#out + 1] = id
    out[#out + 1] = fields[2]
    out[#out + 1] = n
    out[#out + 1] = fields[4] or ''
  end
end
local horizon = now - tonumber(ARGV[7])
local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1]
if first then
  local oldest = tonumber(string.match(first[1], '^(%d+)'))
  if oldest < horizon then horizon = oldest end
end
out[2] = horizon
return out
"#);

/// The start of a careful round (see [`READ_BATCH`]): every shard of the round
/// on this server gets a marker naming no write (`-`). KEYS: the markers
/// (`applying`). ARGV: `[ttl_ms]`.
pub const MARK_ROUND: &str = concat!(allow_oom!(), r#"
for _, k in ipairs(KEYS) do
  redis.call('DEL', k)
  redis.call('SADD', k, '-')
  redis.call('PEXPIRE', k, ARGV[1])
end
return #KEYS
"#);

/// Before one apply-step call of a careful round, as the shard's lease holder
/// (renewing the lease): the previous call's writes leave the shard's marker and
/// this call's enter it. KEYS: `[lease, applying]`. ARGV: `[token, lease_ttl_ms,
/// marker_ttl_ms, previous count, previous id*, id*]`. Reply: 1, or 0 when the
/// lease is not ours (nothing is marked).
pub const MARK_CALL: &str = concat!(allow_oom!(), r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local previous = tonumber(ARGV[4])
for i = 5, 4 + previous do redis.call('SREM', KEYS[2], ARGV[i]) end
redis.call('SADD', KEYS[2], '-')
for i = 5 + previous, #ARGV do redis.call('SADD', KEYS[2], ARGV[i]) end
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
"#);

/// Move entries past their attempt limit that the database does not have (or
/// whose apply step kept failing) to the dead-letter stream with their error
/// (given, or else the last one recorded): the entry leaves the shard's stream,
/// its status key says `dead` (for the status retention), and a notice goes to
/// `done` for waiting status reads.
///
/// A tenant's dead-lettered writes are settled (see `tenant_lua`).
///
/// KEYS: `[stream, attempts, dead, dead_status_prefix, done, stats, tenants]`.
/// ARGV: `[group, shard, retention_ms, (entry_id, payload, error, attempts,
/// tenant)*]`, an empty error or attempt count meaning the one recorded.
pub const DEAD_LETTER: &str = concat!(allow_oom!(), count_lua!(), tenant_lua!(), r#"
for i = 4, #ARGV, 5 do
  local id = ARGV[i]
  local err = ARGV[i + 2]
  if err == '' then err = redis.call('HGET', KEYS[2], 'err:' .. id) or 'unknown error' end
  local n = tonumber(ARGV[i + 3]) or tonumber(redis.call('HGET', KEYS[2], id) or '0')
  local entry = {'id', ARGV[2] .. '-' .. id, 'w', ARGV[i + 1], 'error', err, 'attempts', tostring(n)}
  if ARGV[i + 4] ~= '' then
    entry[9] = 't'
    entry[10] = ARGV[i + 4]
  end
  redis.call('XADD', KEYS[3], '*', unpack(entry))
  redis.call('SET', KEYS[4] .. id, err, 'PX', ARGV[3])
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', 100, '*', 'dead', id)
  redis.call('XACK', KEYS[1], ARGV[1], id)
  settle(KEYS[7], ARGV[i + 4], redis.call('XDEL', KEYS[1], id))
  redis.call('HDEL', KEYS[2], id, 'err:' .. id)
end
count(KEYS[6], 'dead', (#ARGV - 3) / 5, false)
return (#ARGV - 3) / 5
"#);

/// The Spin hosts draining the queue: a node (`name`, unless empty) says it is
/// alive, those not seen within `window_ms` are forgotten, and the rest are
/// listed with when each was last seen.
/// KEYS: `[nodes]`, ARGV: `[name, window_ms]`. Reply: `now_ms, (name, seen_ms)*`.
pub const NODES_SEEN: &str = concat!(allow_oom!(), r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[2])
if ARGV[1] ~= '' then
  redis.call('ZADD', KEYS[1], now, ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window - 1)
redis.call('PEXPIRE', KEYS[1], window)
local out = {now}
local seen = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 1, #seen, 2 do
  out[#out + 1] = seen[i]
  out[#out + 1] = tonumber(seen[i + 1])
end
return out
"#);

/// Whether a shard has queued writes (or scheduled ones now due) and no lease
/// holder: work a processor may claim. A shard backing off (its lease holds
/// [`BACKING_OFF`]) counts as claimable only for an operator's drain
/// (`end_backoff` = `1`). Of the other unheld shards, the one whose next
/// scheduled write is due soonest within `lead_ms` gives `wait_ms` (a drain
/// waits for it). Every shard with a schedule, held or not, has its alarm set
/// (see `schedule_lua`; no sooner than `lead_ms` from now for one due within
/// the lead, nor before its lease expires for a held one): a lost alarm is set
/// again, and should a waiting drain die, or a holder let go, that expiry
/// wakes another.
/// KEYS: `[stream, lease, sched, alarm]*`, ARGV: `[end_backoff, lead_ms,
/// shard*]` (one shard per call, one hash slot, unless the shards share a
/// server). Reply: `wait_ms` (-1: none), the number of claimable shards, those
/// shards, then `(shard, alarm ttl_ms)` for each alarm set.
pub const CLAIMABLE: &str = concat!(allow_oom!(), add_entry_lua!(), schedule_lua!(), r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lead = tonumber(ARGV[2])
local wait, claimable, armed = -1, {}, {}
for i = 3, #ARGV do
  local k = 4 * (i - 3)
  local lease = redis.call('GET', KEYS[k + 2])
  local free = lease == false or (ARGV[1] == '1' and lease == 'backoff')
  local first = redis.call('ZRANGE', KEYS[k + 3], 0, 0, 'WITHSCORES')
  local due_in = first[2] and tonumber(first[2]) - now
  if free and (redis.call('XLEN', KEYS[k + 1]) > 0 or (due_in and due_in <= 0)) then
    claimable[#claimable + 1] = ARGV[i]
  elseif free and due_in and due_in <= lead and (wait < 0 or due_in < wait) then
    wait = due_in
  end
  if due_in then
    -- A held (or backing-off) shard's holder moves its writes; should it let
    -- go without reading again, the alarm wakes a drain once its lease is up.
    local floor = now + 1
    if not free then floor = now + math.max(lead, redis.call('PTTL', KEYS[k + 2])) end
    local _, set = arm(KEYS[k + 3], KEYS[k + 4], now, floor, lead)
    if set > 0 then
      armed[#armed + 1] = ARGV[i]
      armed[#armed + 1] = set
    end
  end
end
local out = {wait, #claimable}
for _, s in ipairs(claimable) do out[#out + 1] = s end
for _, v in ipairs(armed) do out[#out + 1] = v end
return out
"#);

/// Acknowledge applied entries: XACK, XDEL (so XLEN is the queue depth), forget
/// their attempts (many ids per command), and add one notice to the shard's capped
/// `done` stream for status reads waiting on these writes.
/// Counts the batch's new outcomes (`applied`, `rejected`) and how long after
/// they were due they were applied (a histogram: `call::delay_fields`) in the
/// shard's stats, and settles each tenant's writes that left the stream (see
/// `tenant_lua`): those this call deleted, so a write acknowledged twice is
/// settled once.
/// KEYS: `[stream, attempts, done, stats, tenants]`, ARGV: `[group, applied,
/// rejected, fields, (stats field, n)*, (tenant, count, entry_id*count)*]`
/// (the entries grouped by tenant, `''` for none).
pub const ACK: &str = concat!(allow_oom!(), count_lua!(), tenant_lua!(), r#"
local fields = tonumber(ARGV[4])
for f = 1, fields do count(KEYS[4], ARGV[3 + 2 * f], tonumber(ARGV[4 + 2 * f]), false) end
local total, i = 0, 5 + 2 * fields
local track = redis.call('EXISTS', KEYS[2]) == 1
while i <= #ARGV do
  local tenant, k = ARGV[i], tonumber(ARGV[i + 1])
  local first, last = i + 2, i + 1 + k
  for a = first, last, 1000 do
    local b = math.min(a + 999, last)
    redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, a, b))
    settle(KEYS[5], tenant, redis.call('XDEL', KEYS[1], unpack(ARGV, a, b)))
  end
  if track then
    for a = first, last do redis.call('HDEL', KEYS[2], ARGV[a], 'err:' .. ARGV[a]) end
  end
  total = total + k
  i = last + 1
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', 100, '*', 'n', total)
count(KEYS[4], 'applied', tonumber(ARGV[2]), true)
count(KEYS[4], 'rejected', tonumber(ARGV[3]), false)
return total
"#);

/// Record why a batch failed, for the dead letter, and count the deliveries to
/// retry. KEYS: `[attempts, stats]`, ARGV: `[error, entry_id*]`.
pub const RECORD_ERROR: &str = concat!(allow_oom!(), count_lua!(), r#"
for i = 2, #ARGV do
  redis.call('HSET', KEYS[1], 'err:' .. ARGV[i], ARGV[1])
end
count(KEYS[2], 'retried', #ARGV - 1, false)
return #ARGV - 1
"#);

/// What a key's fill lock holds between fills when the database had no record:
/// the negative cache entry (see [`FILL_BEGIN`]). Lock tokens are hex, so never this.
pub const ABSENT: &str = "absent";

/// Take many single-flight fill locks at once (a negative cache entry counts as
/// free, and taking the lock drops it). KEYS: locks, ARGV: `[token, ttl_ms]`.
/// Reply: 1 or 0 per key.
pub const LOCKS_ACQUIRE: &str = r#"
local out = {}
for i = 1, #KEYS do
  local v = redis.call('GET', KEYS[i])
  if v == false or v == 'absent' then
    redis.call('SET', KEYS[i], ARGV[1], 'PX', ARGV[2])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"#;

/// A reader's cache miss: 2 if the key is known absent (its fill lock holds the
/// negative entry [`ABSENT`]), else 1 if the fill lock was taken, 0 if another
/// filler holds it. KEYS: `[lock]`, ARGV: `[token, ttl_ms]`.
///
/// Negative caching: a filler that finds no record replaces its lock with
/// [`ABSENT`] for a while ([`FILL_ABSENT`]), so a flood of reads of a missing key
/// stops at Redis. Every writer of the cache takes the key's fill lock first
/// ([`LOCKS_ACQUIRE_LEASED`], [`LOCKS_ACQUIRE`]), which drops the entry; so when
/// the processor creates the key, the entry is gone before the write is
/// acknowledged, and the creation is visible at once.
pub const FILL_BEGIN: &str = r#"
local v = redis.call('GET', KEYS[1])
if v == 'absent' then return 2 end
if v then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"#;

/// A filler that found no record: its lock becomes the negative entry, if still
/// its own. KEYS: `[lock]`, ARGV: `[token, ttl_ms]`. Reply 1 if set.
pub const FILL_ABSENT: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], 'absent', 'PX', ARGV[2])
return 1
"#;

/// The processor's refresh locks: take each key's fill lock only while the lease of
/// the key's shard is still ours, in one atomic step, so a holder whose lease
/// expired cannot write an older value into the cache after the new holder has
/// written a newer one (whoever holds a fill lock writes before the next may).
/// Each lease still ours is renewed (ARGV's TTL is the lease TTL): a refresh that
/// waits out a busy lock does not lose its shard meanwhile, and its wait, not the
/// lease, decides when it gives up.
/// KEYS: `[lease_1..lease_m, lock_1..lock_n]`; ARGV: `[m, lock_token, ttl_ms,
/// lease_token_1..lease_token_m, lease_index_1..lease_index_n]` (1-based). The
/// processor calls it per shard (m = 1), so its keys are one hash slot.
/// Reply per lock: 1 taken, 0 busy, 2 its shard's lease is lost. A negative cache
/// entry counts as free (see [`FILL_BEGIN`]).
pub const LOCKS_ACQUIRE_LEASED: &str = concat!(allow_oom!(), r#"
local m = tonumber(ARGV[1])
local ours = {}
for i = 1, m do
  ours[i] = redis.call('GET', KEYS[i]) == ARGV[3 + i]
  if ours[i] then redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
end
local out = {}
for j = m + 1, #KEYS do
  if not ours[tonumber(ARGV[3 + j])] then
    out[#out + 1] = 2
  else
    local v = redis.call('GET', KEYS[j])
    if v == false or v == 'absent' then
      redis.call('SET', KEYS[j], ARGV[2], 'PX', ARGV[3])
      out[#out + 1] = 1
    else
      out[#out + 1] = 0
    end
  end
end
return out
"#);

/// Release locks we hold (compare-and-delete each). KEYS: locks, ARGV: `[token]`.
pub const LOCKS_RELEASE: &str = concat!(allow_oom!(), r#"
local n = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then n = n + redis.call('DEL', KEYS[i]) end
end
return n
"#);

/// Replay dead letters of one shard back onto its stream (new write ids), marking
/// each old id's status `replayed:<new id>` (for the status retention) and setting
/// the doorbell flag (the caller rings it).
///
/// A replayed write keeps its tenant and counts in its depth again (an
/// operator's replay is not throttled).
///
/// KEYS: `[dead, dead_status_prefix, stream, bell, stats, sched, sched_w,
/// tenants]`.
/// ARGV: `[seq_start, bell_ttl_ms, shard, retention_ms, write_id*]` (no write
/// ids: all of the shard); the first new entry is added as intake adds a
/// request's (see `add_entry_lua`), so that a new id never repeats one the
/// database recorded before a failover. Scheduled writes that are due move
/// into the stream first (see `schedule_lua`); with more due than one call
/// moves, the replayed writes join the schedule, due now, behind them.
/// Reply: `(old write id, new write id)*`.
pub const REPLAY: &str = concat!(count_lua!(), dead_lua!(), add_entry_lua!(), schedule_lua!(), r#"
local out = {}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local _, behind = move_due(KEYS[6], KEYS[7], KEYS[3], now, 100, ARGV[4], tonumber(ARGV[1]))
local first_ms
for i, d in ipairs(matching_dead(KEYS[1], 5)) do
  local f = d[2]
  local new
  if behind then
    new = schedule(KEYS[6], KEYS[7], now, f['w'], tonumber(ARGV[1]) + i, f['t'])
  elseif first_ms then
    new = redis.call('XADD', KEYS[3], first_ms .. '-*', fields(f['w'], f['t']))
  else
    new = add_entry(KEYS[3], f['w'], now, tonumber(ARGV[1]), f['t'])
    first_ms = string.match(new, '^(%d+)')
  end
  if f['t'] then redis.call('HINCRBY', KEYS[8], 'd:' .. f['t'], 1) end
  local new_id = ARGV[3] .. '-' .. new
  local entry = string.sub(f['id'], string.len(ARGV[3]) + 2)
  redis.call('SET', KEYS[2] .. entry, 'replayed:' .. new_id, 'PX', ARGV[4])
  redis.call('XDEL', KEYS[1], d[1])
  out[#out + 1] = f['id']
  out[#out + 1] = new_id
end
count(KEYS[5], 'replayed', #out / 2, false)
if #out > 0 then
  redis.call('SET', KEYS[4], now, 'PX', ARGV[2])
end
return out
"#);

/// Purge dead letters of one shard (the given write ids, or all): they leave the
/// dead-letter stream and their status says `purged` (for the status retention).
/// KEYS: `[dead, dead_status_prefix, stats]`.
/// ARGV: `[shard, retention_ms, write_id*]` (no write ids: all of the shard).
/// Reply: the purged write ids.
pub const PURGE: &str = concat!(allow_oom!(), count_lua!(), dead_lua!(), r#"
local out = {}
for _, d in ipairs(matching_dead(KEYS[1], 3)) do
  local id = d[2]['id']
  redis.call('SET', KEYS[2] .. string.sub(id, string.len(ARGV[1]) + 2), 'purged', 'PX', ARGV[2])
  redis.call('XDEL', KEYS[1], d[1])
  out[#out + 1] = id
end
count(KEYS[3], 'purged', #out, false)
return out
"#);

/// One shard's figures for the stats. KEYS: `[stream, lease, dead, stats,
/// sched]`, ARGV: `[group]`. Reply: `depth, unacknowledged, oldest entry id (or
/// ''), dead letters, lease holder (or ''), lease ms left, now ms, scheduled
/// writes, next due ms (-1: none), (field, value)*` of the stats hash.
pub const SHARD_STATS: &str = r#"
local depth = redis.call('XLEN', KEYS[1])
local unacked = 0
if depth > 0 then
  local ok, p = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1])
  if ok then unacked = p[1] end
end
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
local oldest = ''
if first then oldest = first[1] end
local holder = redis.call('GET', KEYS[2]) or ''
local t = redis.call('TIME')
local next_due = redis.call('ZRANGE', KEYS[5], 0, 0, 'WITHSCORES')[2]
local out = {depth, unacked, oldest, redis.call('XLEN', KEYS[3]), holder, redis.call('PTTL', KEYS[2]),
  tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), redis.call('ZCARD', KEYS[5]),
  next_due and tonumber(next_due) or -1}
for _, v in ipairs(redis.call('HGETALL', KEYS[4])) do out[#out + 1] = v end
return out
"#;

/// Cancel a scheduled write that is still in its shard's schedule: it leaves
/// the schedule, its status key says `cancelled` (for the status retention),
/// and a notice goes to `done` for waiting status reads.
/// Its tenant's write is settled (see `tenant_lua`).
/// KEYS: `[sched, sched_w, dead_status_prefix, stats, done, tenants]`. ARGV:
/// `[due_ms, sequence (16 digits), retention_ms, entry_id]`. Reply: 1
/// cancelled, 0 not in the schedule (moved into the stream already,
/// cancelled, or no such write).
pub const CANCEL: &str = concat!(count_lua!(), add_entry_lua!(), schedule_lua!(), tenant_lua!(), r#"
if tonumber(redis.call('ZSCORE', KEYS[1], ARGV[2]) or '-1') ~= tonumber(ARGV[1]) then return 0 end
local _, name = unpack_write(redis.call('HGET', KEYS[2], ARGV[2]) or '')
settle(KEYS[6], name, 1)
redis.call('ZREM', KEYS[1], ARGV[2])
redis.call('HDEL', KEYS[2], ARGV[2])
redis.call('SET', KEYS[3] .. ARGV[4], 'cancelled', 'PX', ARGV[3])
redis.call('XADD', KEYS[5], 'MAXLEN', '~', 100, '*', 'cancelled', ARGV[4])
count(KEYS[4], 'cancelled', 1, false)
return 1
"#);

/// Whether a write is in its shard's schedule. KEYS: `[sched]`, ARGV:
/// `[due_ms, sequence (16 digits)]`. Reply: 1 or 0.
pub const SCHEDULED: &str = r#"
if tonumber(redis.call('ZSCORE', KEYS[1], ARGV[2]) or '-1') == tonumber(ARGV[1]) then return 1 end
return 0
"#;

/// Add a cache instance's counts: KEYS `[cache_stats]`, ARGV `[hits, misses]`.
pub const CACHE_COUNT: &str = r#"
if tonumber(ARGV[1]) > 0 then redis.call('HINCRBY', KEYS[1], 'hits', ARGV[1]) end
if tonumber(ARGV[2]) > 0 then redis.call('HINCRBY', KEYS[1], 'misses', ARGV[2]) end
return 1
"#;

#[cfg(test)]
mod tests {
    /// The SHA1 Redis gives `SCRIPT LOAD "return 1"` (its documentation's
    /// example), and one per script.
    #[test]
    fn script_shas_are_redis_s() {
        assert_eq!(super::sha1_hex("return 1"), "e0e1f9fabfc9d4800c877a703b823ac0578ff8db");
        assert_ne!(super::sha1_hex(super::ENQUEUE), super::sha1_hex(super::SHARD_STATS));
    }
}
