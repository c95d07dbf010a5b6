-- The broker state machine of one topic, run atomically inside Redis.
--
-- mqs.broker._redis loads this file as a library (FUNCTION LOAD, Redis 7
-- and later) and runs each operation with FCALL. On older servers it
-- runs the file as a script with EVALSHA, which executes every line of it
-- on each call. Defining the functions again took about 60 us of the
-- 90 us of an in_flight call that way (Redis 7.0.15, 2-vCPU guest).
-- KEYS[1] is the topic's hash "<P>meta", where P is "{<namespace>:<topic>}:".
-- Every other key of the topic starts with P, so Redis Cluster puts all of
-- them in the slot of that hash tag. ARGV[1] names the operation; the
-- branches at the end of this file list the arguments of each.
--
-- Keys (L is a lane priority, G a group name, K a key token):
--   P meta         hash: cfg (JSON), seq, lastms, counters "c.<name>"
--   P s:L          stream of lane L; entry id "<ms>-<seq>" is the message id
--   P groups       hash G -> max_attempts override ("" for none)
--   P refs         hash id -> groups that still need the entry (absent: 0),
--                  less one for an entry published to exactly one group on
--                  a topic without retention: such an entry stores nothing
--                  at publish, its group's finish takes the count below 1,
--                  which deletes it, and create_group recounts it before a
--                  second group enters it
--   P ret          zset "L|id" -> time (ms) the entry is kept until
--   P tm           zset of timers, scored by their time in ms: "D<id>|G"
--                  (delay due), "A<id>|G" (ack deadline moved by extend),
--                  "B<n>|G" (ack deadline of the deliveries of one fetch),
--                  "L<consumer>|G" (end of a consumer's lease)
--   P dl:<n>       list "id|ticket": the deliveries of timer "B<n>|G"
--   P dlq          stream of dead letters
--   P rd           hash id -> msgpack copy of a redriven entry's fields
--   P dd:<token>   string: message id of a dedup_id, with PX = dedup window
--   P wake         stream with one entry, appended after every change
--   P g:G\0st      hash id -> msgpack record of an entry in the group
--   P g:G\0err     hash id -> "=" .. last error
--   P g:G\0rq:L    list "id|pos": entries ready again in lane L
--   P g:G\0kh      hash K -> id of the key's one visible entry
--   P g:G\0kw:K    list of ids waiting behind that entry
--   P g:G\0sch     hash: "c<L>" cursor (last id read), "drr" scheduler and
--                  "bk" token buckets (msgpack)
--   P g:G\0cons    hash consumer -> prefetch
--   P g:G\0inf     hash consumer -> messages it holds in flight
--   P g:G\0lf      hash consumer -> "<call id> <n>": its last fetch that
--                  took messages, and its timer "B<n>|G"
--   P g:G\0ls      hash consumer -> its lease in ms: a consumer that makes
--                  no fetch for that long, and holds nothing in flight,
--                  is removed when its timer "L<consumer>|G" fires
--   P g:G\0ctr     hash: the group's counters (delivered, acked, nacked,
--                  redelivered, dead_lettered, errors)
--   P g:G\0hist    hash: sampled latency histograms, "e" enqueue to
--                  deliver and "a" deliver to ack: "<h>:<bucket>" counts
--                  in the buckets of mqs.metrics.hist_index, and "<h>:n",
--                  "<h>:sum" and "<h>:max" in ns
--
-- Each group reads its lanes with XREADGROUP, in stream order, when the
-- entry reaches the head of the lane. Entries that are not ready then
-- (hidden behind their key, or delayed) are read on behalf of the
-- consumer "mqs.parked" and wait in the group's own structures. An entry
-- that is ready again (nack, missed deadline, due delay, key turn) goes
-- to the list rq:L with pos = the topic's sequence number at that time:
-- it comes after every stream entry with seq <= pos, so a lane is the
-- merge of its stream and its list, which is the tail order of a queue.
-- A released entry gets pos 0 and goes to the list's head.
--
-- The pending entries list (PEL) of each group follows the records: an
-- in-flight entry is owned by its consumer with the delivery count equal
-- to its attempts; any other entry read by the group is owned by
-- "mqs.parked". Ack deadlines differ per delivery (ack_timeout per
-- consumer, extend), but XAUTOCLAIM takes one min idle time. So XCLAIM
-- IDLE sets each delivery's PEL idle time to CLAIM_IDLE_MS minus its time
-- left, at delivery and at extend, and the idle time reaches CLAIM_IDLE_MS
-- at the deadline. When a deadline timer finds a delivery overdue,
-- XAUTOCLAIM with that min idle time moves every overdue delivery of the
-- group to "mqs.parked" (reclaim). XPENDING therefore shows an in-flight
-- entry idle for about 31 years less its time left.
--
-- Records, reference counts, in-flight counts, XACK and XDEL go through
-- write-back buffers flushed when the script ends (or before a command
-- that must see them), so a batch costs a few calls instead of a few per
-- message.

-- The call's keys and arguments, and the topic's key names, which
-- begin_call sets. They shadow the globals KEYS and ARGV of EVAL, so the
-- same code runs as a script and as a library function (FCALL).
local KEYS, ARGV
local META, P, OP, GROUPS, REFS, RET, TM, DLQ, RD, WAKE
local PARKED = 'mqs.parked'
-- Min idle time (ms) of the XAUTOCLAIM that takes back overdue
-- deliveries. A delivery's PEL idle time is set to CLAIM_IDLE_MS minus
-- its ack timeout (set_deadline), so it reaches CLAIM_IDLE_MS at the ack
-- deadline. Parked entries are idle only since they were parked, so they
-- never reach it.
local CLAIM_IDLE_MS = 1e12
-- retain_until of entries published while the topic had no group.
local FAR = 1e15
-- Fields of a published entry that a dead letter and a redrive copy.
local ENTRY_FIELDS = {b = true, e = true, p = true, t = true, k = true,
                      h = true, hp = true, r = true, c = true}

local cfg
local NOW
local changed = false
local flying
local invalidate = false
local scheds = {}
-- Counter increments and group cursors, written back when the script ends.
local counts = {}
local cursors = {}
local dirty_cursors = {}
local ids = nil
-- Per group and lane: unread stream entries peeked ahead, and the head
-- of the ready list (false: empty), cached until the list changes.
local peeks = {}
local rq_heads = {}
local load_recs, load_refs, sample_due
local rec_cache = {}
local rec_dirty = {}
local refs_cache = {}
local refs_dirty = {}
-- Ids whose count the refs hash did not contain when loaded.
local refs_absent = {}
local inflight_delta = {}
local stream_acks = {}
local stream_dels = {}
-- Reads taken by one consumer and not sent yet, per group and lane:
-- consecutive XREADGROUP COUNT 1 calls become one with COUNT n.
local pending_reads = {}

local function stream(lane)
  return P .. 's:' .. lane
end

local function gkey(g, name)
  return P .. 'g:' .. g .. '\0' .. name
end

local function count(name, n)
  counts[name] = (counts[name] or 0) + (n or 1)
end

-- Counter increments of each group, written back with the topic's.
local group_counts = {}

local function gcount(g, name, n)
  local mine = group_counts[g]
  if not mine then
    mine = {}
    group_counts[g] = mine
  end
  mine[name] = (mine[name] or 0) + (n or 1)
end

-- Counters of messages that were dropped (or moved to the dead-letter
-- stream), whose totals the reply carries so that the client can log
-- them. These are the keys of _DROP_KEYS in mqs/broker/_state.py.
-- consumers_expired (consumers removed when their lease ended) is
-- returned the same way, for the client to log.
local DROP_COUNTERS = {deduplicated = true, expired = true,
                       dropped_full = true, dead_lettered = true,
                       dlq_purged = true, dropped_unsubscribed = true,
                       consumers_expired = true}
-- Drop counter name -> {total before this call, total after it}.
local drop_totals = {}

local function save_counts()
  for name, n in pairs(counts) do
    local total = redis.call('HINCRBY', META, 'c.' .. name, n)
    if DROP_COUNTERS[name] then
      local seen = drop_totals[name]
      if seen then
        seen[2] = total
      else
        drop_totals[name] = {total - n, total}
      end
    end
  end
  counts = {}
  for g, mine in pairs(group_counts) do
    for name, n in pairs(mine) do
      redis.call('HINCRBY', gkey(g, 'ctr'), name, n)
    end
  end
  group_counts = {}
end

-- Latency histograms, in the buckets of mqs.metrics.hist_index: exact
-- below 64 ns, then 32 buckets per power of two.
local HIST_MAX_NS = 2 ^ 42 - 1

local function hist_index(ns)
  ns = math.floor(math.min(math.max(ns, 0), HIST_MAX_NS))
  if ns < 64 then
    return ns
  end
  local shift, top = 0, ns
  while top >= 64 do
    top = math.floor(top / 2)
    shift = shift + 1
  end
  return (shift + 1) * 32 + top - 32
end

-- Adds one sampled latency (ms) to histogram `h` ("e" or "a") of `g`.
local function record_latency(g, h, ms)
  local ns = math.floor(math.max(ms, 0) * 1e6)
  local key = gkey(g, 'hist')
  redis.call('HINCRBY', key, h .. ':' .. hist_index(ns), 1)
  redis.call('HINCRBY', key, h .. ':n', 1)
  redis.call('HINCRBY', key, h .. ':sum', ns)
  local max = tonumber(redis.call('HGET', key, h .. ':max')) or 0
  if ns > max then
    redis.call('HSET', key, h .. ':max', ns)
  end
end

-- The topic's sequence number and the millisecond of its last id.
local function id_state()
  if not ids then
    local raw = redis.call('HMGET', META, 'seq', 'lastms', 'batch')
    ids = {seq = tonumber(raw[1]) or 0, ms = tonumber(raw[2]) or 0,
           batch = tonumber(raw[3]) or 0, dirty = false}
  end
  return ids
end

local function save_ids()
  if ids and ids.dirty then
    redis.call('HSET', META, 'seq', ids.seq, 'lastms', ids.ms,
               'batch', ids.batch)
  end
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end

local function seq_of(id)
  return tonumber(string.match(id, '%-(%d+)$'))
end

local function field(arr, name)
  for i = 1, #arr, 2 do
    if arr[i] == name then
      return arr[i + 1]
    end
  end
  return nil
end

local function lane_of(priority)
  for _, lane in ipairs(cfg.lanes) do
    if lane <= priority then
      return lane
    end
  end
  return cfg.lanes[#cfg.lanes]
end

local function timer_member(kind, g, id)
  return kind .. id .. '|' .. g
end

-- Records.

-- Record fields left out when they hold these values: a fresh delivery
-- stores only s, t, a, l, c and dl, so msgpack packs and unpacks fewer
-- fields. Every record read or made gets this metatable.
local REC = {__index = {s = '', t = 0, a = 0, k = '', r = 1, c = '', p = 0,
                        d = 0, x = 0, rd = 0}}

local function unpack_rec(raw)
  return setmetatable(cmsgpack.unpack(raw), REC)
end

-- The record cache and the changed records, per group: nested tables
-- rather than "g\0id" keys, which would build a string per lookup.
local function group_table(tables, g)
  local found = tables[g]
  if not found then
    found = {}
    tables[g] = found
  end
  return found
end

local function get_rec(g, id)
  local cache = group_table(rec_cache, g)
  local rec = cache[id]
  if rec == nil then
    local raw = redis.call('HGET', gkey(g, 'st'), id)
    rec = raw and unpack_rec(raw) or false
    cache[id] = rec
  end
  return rec or nil
end

local function put_rec(g, id, rec)
  group_table(rec_cache, g)[id] = rec
  group_table(rec_dirty, g)[id] = true
end

local function del_rec(g, id)
  group_table(rec_cache, g)[id] = false
  group_table(rec_dirty, g)[id] = true
end

-- Runs `command key` with the arguments in `args`, in chunks that fit
-- Lua's stack.
local function call_chunked(command, key, args, prefix)
  local step = 2000
  for i = 1, #args, step do
    local chunk = {command, key}
    for _, value in ipairs(prefix or {}) do
      chunk[#chunk + 1] = value
    end
    for j = i, math.min(#args, i + step - 1) do
      chunk[#chunk + 1] = args[j]
    end
    redis.call(unpack(chunk))
  end
end

local function save_recs()
  for g, dirty in pairs(rec_dirty) do
    local cache = rec_cache[g]
    local sets, dels = {}, {}
    for id, _ in pairs(dirty) do
      local rec = cache[id]
      if rec then
        sets[#sets + 1] = id
        sets[#sets + 1] = cmsgpack.pack(rec)
      else
        dels[#dels + 1] = id
      end
    end
    call_chunked('HSET', gkey(g, 'st'), sets)
    call_chunked('HDEL', gkey(g, 'st'), dels)
  end
  rec_dirty = {}
end

-- Reads the records of `ids` into the cache with one HMGET per 1000.
load_recs = function(g, ids)
  local st = gkey(g, 'st')
  local cache = group_table(rec_cache, g)
  for i = 1, #ids, 1000 do
    local chunk = {}
    for j = i, math.min(#ids, i + 999) do
      if cache[ids[j]] == nil then
        chunk[#chunk + 1] = ids[j]
      end
    end
    if #chunk > 0 then
      local raw = redis.call('HMGET', st, unpack(chunk))
      for j, id in ipairs(chunk) do
        cache[id] = raw[j] and unpack_rec(raw[j]) or false
      end
    end
  end
end

-- Reference counts: how many groups still need an entry (0: none).
local function get_refs(id)
  local n = refs_cache[id]
  if n == nil then
    n = tonumber(redis.call('HGET', REFS, id))
    if not n then
      n = 0
      refs_absent[id] = true
    end
    refs_cache[id] = n
  end
  return n
end

-- Reads the reference counts of `ids` into the cache, as load_recs.
load_refs = function(ids)
  for i = 1, #ids, 1000 do
    local chunk = {}
    for j = i, math.min(#ids, i + 999) do
      if refs_cache[ids[j]] == nil then
        chunk[#chunk + 1] = ids[j]
      end
    end
    if #chunk > 0 then
      local raw = redis.call('HMGET', REFS, unpack(chunk))
      for j, id in ipairs(chunk) do
        refs_cache[id] = tonumber(raw[j]) or 0
        refs_absent[id] = not raw[j] or nil
      end
    end
  end
end

local function set_refs(id, n)
  refs_cache[id] = n
  refs_dirty[id] = true
  return n
end

local function save_refs()
  local sets, dels = {}, {}
  for id, _ in pairs(refs_dirty) do
    local n = refs_cache[id]
    if n > 0 then
      sets[#sets + 1] = id
      sets[#sets + 1] = n
    elseif not refs_absent[id] then
      dels[#dels + 1] = id
    end
  end
  call_chunked('HSET', REFS, sets)
  call_chunked('HDEL', REFS, dels)
  refs_dirty = {}
end

-- Deferred XACK and XDEL: the entries are finished already.
local function defer_ack(lane, g, id)
  local by_lane = group_table(stream_acks, g)
  local batch = by_lane[lane]
  if not batch then
    batch = {lane = lane, g = g, ids = {}}
    by_lane[lane] = batch
  end
  batch.ids[#batch.ids + 1] = id
end

local function defer_del(lane, id)
  local ids = stream_dels[lane]
  if not ids then
    ids = {}
    stream_dels[lane] = ids
  end
  table.insert(ids, id)
end

-- Sends the pending reads of one group and lane (all when `name` is nil).
local function flush_reads(name)
  local todo = pending_reads
  if name then
    todo = {[name] = pending_reads[name]}
  end
  for key, read in pairs(todo) do
    local got = redis.call('XREADGROUP', 'GROUP', read.g, read.consumer,
                           'COUNT', read.n, 'STREAMS', stream(read.lane),
                           '>')
    local entries = got and got[1][2] or {}
    if #entries ~= read.n or entries[#entries][1] ~= read.last then
      error('MQS_BUG XREADGROUP returned ' .. #entries .. ' entries, ' ..
            'expected ' .. read.n .. ' up to ' .. read.last)
    end
    pending_reads[key] = nil
  end
end

-- Deliveries whose PEL idle time encodes their ack deadline, per group,
-- lane, consumer and ack timeout, sent by save_stream_ops after the reads.
local deadline_claims = {}

-- Sets the PEL idle time of delivery `id` (owned by `consumer`) so that
-- it reaches CLAIM_IDLE_MS after `ms` milliseconds: XCLAIM ... IDLE with
-- JUSTID, which keeps the delivery count.
local last_claim = nil

local function set_deadline(g, lane, consumer, id, ms)
  local claim = last_claim
  if not (claim and claim.g == g and claim.lane == lane
          and claim.consumer == consumer and claim.ms == ms
          and deadline_claims[claim.name]) then
    local name = g .. '\0' .. lane .. '\0' .. consumer .. '\0' .. ms
    claim = deadline_claims[name]
    if not claim then
      claim = {g = g, lane = lane, consumer = consumer, ms = ms, ids = {},
               name = name}
      deadline_claims[name] = claim
    end
    last_claim = claim
  end
  claim.ids[#claim.ids + 1] = id
end

local function idle_for(ms)
  return math.max(0, CLAIM_IDLE_MS - math.ceil(ms))
end

local function save_deadlines()
  for _, claim in pairs(deadline_claims) do
    local idle = idle_for(claim.ms)
    for i = 1, #claim.ids, 1000 do
      local args = {'XCLAIM', stream(claim.lane), claim.g, claim.consumer,
                    0}
      for j = i, math.min(#claim.ids, i + 999) do
        args[#args + 1] = claim.ids[j]
      end
      args[#args + 1] = 'IDLE'
      args[#args + 1] = idle
      args[#args + 1] = 'JUSTID'
      redis.call(unpack(args))
    end
  end
  deadline_claims = {}
end

-- Sends the deferred reads, then the XACK and XDEL calls, whose
-- entries the reads must reach first.
local function save_stream_ops()
  flush_reads(nil)
  if next(deadline_claims) then
    save_deadlines()
  end
  for _, by_lane in pairs(stream_acks) do
    for _, batch in pairs(by_lane) do
      call_chunked('XACK', stream(batch.lane), batch.ids, {batch.g})
    end
  end
  for lane, ids in pairs(stream_dels) do
    call_chunked('XDEL', stream(lane), ids)
  end
  stream_acks = {}
  stream_dels = {}
end

-- Returns the messages a consumer has in flight, with this call's changes.
local function inflight_add(g, consumer, n)
  local deltas = group_table(inflight_delta, g)
  deltas[consumer] = (deltas[consumer] or 0) + n
end

local function inflight(g, consumer)
  local held = tonumber(redis.call('HGET', gkey(g, 'inf'), consumer)) or 0
  return held + (group_table(inflight_delta, g)[consumer] or 0)
end

local function save_inflight()
  for g, deltas in pairs(inflight_delta) do
    for consumer, n in pairs(deltas) do
      if n ~= 0 then
        redis.call('HINCRBY', gkey(g, 'inf'), consumer, n)
      end
    end
  end
  inflight_delta = {}
end

-- A record for an entry read from its stream: s is its state ("" while
-- being handled, H hidden, D delayed, R ready in rq, F in flight, X
-- finished before the group read it), t the ticket of its delivery tag,
-- a its attempts, r 1 once the group read it, d and x its due and expiry
-- times (ms, 0 for none), dl its ack deadline, rd 1 when its fields are
-- a redriven copy in P rd.
local function new_rec(lane, fields)
  local key, due, expiry = '', 0, 0
  for i = 1, #fields, 2 do
    local name = fields[i]
    if name == 'k' then
      key = fields[i + 1]
    elseif name == 'd' then
      due = tonumber(fields[i + 1])
    elseif name == 'x' then
      expiry = tonumber(fields[i + 1])
    end
  end
  local rec = setmetatable({l = lane}, REC)
  if key ~= '' then
    rec.k = key
  end
  if due ~= 0 then
    rec.d = due
  end
  if expiry ~= 0 then
    rec.x = expiry
  end
  return rec
end

local function load_fields(id, lane, redriven)
  if redriven == 1 then
    local raw = redis.call('HGET', RD, id)
    if raw then
      return cmsgpack.unpack(raw)
    end
  end
  local found = redis.call('XRANGE', stream(lane), id, id)
  if #found == 0 then
    return nil
  end
  return found[1][2]
end

-- Scheduler and token buckets of a group, saved when the script ends.

local function sched(g)
  local state = scheds[g]
  if state then
    return state
  end
  local raw = redis.call('HMGET', gkey(g, 'sch'), 'drr', 'bk')
  -- A new group starts a round on the highest lane (see restart).
  state = {cursor = #cfg.lanes, d = {}, bk = {}}
  if raw[1] then
    local drr = cmsgpack.unpack(raw[1])
    state.cursor = drr[1]
    state.d = drr[2]
  end
  if raw[2] then
    state.bk = cmsgpack.unpack(raw[2])
  end
  for i = 1, #cfg.lanes do
    state.d[i] = state.d[i] or 0
  end
  scheds[g] = state
  return state
end

local function save_cursors()
  for name, where in pairs(dirty_cursors) do
    redis.call('HSET', gkey(where[1], 'sch'), 'c' .. where[2], cursors[name])
  end
end

local function save_scheds()
  for g, state in pairs(scheds) do
    redis.call('HSET', gkey(g, 'sch'),
               'drr', cmsgpack.pack({state.cursor, state.d}),
               'bk', cmsgpack.pack(state.bk))
  end
end

local function bucket(g, name, rate)
  local bk = sched(g).bk
  local b = bk[name]
  if not b then
    b = {tok = rate.capacity, stamp = -1, cur = rate.per_second,
         cut = -1e18}
    bk[name] = b
  end
  return b
end

local function refill(b, rate)
  if b.stamp >= 0 and NOW > b.stamp then
    b.tok = math.min(rate.capacity,
                     b.tok + (NOW - b.stamp) / 1000 * b.cur)
  end
  if b.stamp < 0 or NOW > b.stamp then
    b.stamp = NOW
  end
end

local function lane_rate(lane)
  for _, pair in ipairs(cfg.lane_rates) do
    if pair[1] == lane then
      return pair[2]
    end
  end
  return nil
end

-- Returns the buckets that a delivery from `lane` takes a token from.
local function buckets_of(g, lane)
  local found = {}
  if cfg.rate then
    found[#found + 1] = {bucket(g, 't', cfg.rate), cfg.rate}
  end
  local rate = lane_rate(lane)
  if rate then
    found[#found + 1] = {bucket(g, 'l' .. lane, rate), rate}
  end
  return found
end

local function bucket_ready(b, rate)
  refill(b, rate)
  return b.tok >= 1
end

local function bucket_ready_at(b, rate)
  refill(b, rate)
  if b.tok >= 1 then
    return NOW
  end
  return NOW + (1 - b.tok) / b.cur * 1000
end

local function on_success(g, lane)
  if not cfg.rate and #cfg.lane_rates == 0 then
    return
  end
  for _, pair in ipairs(buckets_of(g, lane)) do
    local b, rate = pair[1], pair[2]
    if rate.adaptive and b.cur < rate.per_second then
      b.cur = math.min(rate.per_second,
                       b.cur + rate.per_second * rate.increase)
    end
  end
end

local function on_failure(g, lane)
  for _, pair in ipairs(buckets_of(g, lane)) do
    local b, rate = pair[1], pair[2]
    if rate.adaptive and NOW - b.cut >= rate.cut_interval_ms then
      refill(b, rate)
      b.cut = NOW
      b.cur = math.max(rate.floor, b.cur * rate.decrease)
    end
  end
end

-- Start a new round as LaneScheduler.restart does. The cursor goes to
-- the lowest lane with no credits, so that the next step moves to the
-- highest lane and starts its turn.
local function restart(state)
  state.cursor = #cfg.lanes
  for i = 1, #cfg.lanes do
    state.d[i] = 0
  end
end

-- Deficit round robin over the eligible lanes, as LaneScheduler.pick.
local function pick(g, eligible)
  local n = 0
  local only
  for lane, _ in pairs(eligible) do
    n = n + 1
    only = lane
  end
  if n == 0 then
    return nil
  end
  local lanes = cfg.lanes
  if cfg.strict then
    for _, lane in ipairs(lanes) do
      if eligible[lane] then
        return lane
      end
    end
  end
  local state = sched(g)
  local total = #lanes
  if n == 1 then
    -- Only this lane has messages, so no other lane's share needs
    -- keeping. A new round lets the highest lane go first the next
    -- time several lanes are ready.
    restart(state)
    return only
  end
  for _ = 1, 2 * total + 1 do
    local i = state.cursor
    local lane = lanes[i]
    if eligible[lane] then
      if state.d[i] >= 1 then
        state.d[i] = state.d[i] - 1
        return lane
      end
    else
      state.d[i] = 0
    end
    state.cursor = i % total + 1
    if eligible[lanes[state.cursor]] then
      state.d[state.cursor] = state.d[state.cursor]
        + cfg.weights[state.cursor]
    end
  end
  error('MQS_BUG lane scheduler found no lane')
end

-- Entry transitions.

local finish
local dead_letter

local function make_ready(g, id, rec, front)
  rec.s = 'R'
  rec.t = rec.t + 1
  -- ra: when it joined its lane; a released one keeps its earlier time.
  if not front or not rec.ra then
    rec.ra = NOW
  end
  local list = gkey(g, 'rq:' .. rec.l)
  rq_heads[g .. '\0' .. rec.l] = nil
  if front then
    rec.p = 0
    redis.call('LPUSH', list, id .. '|0')
  else
    rec.p = id_state().seq
    redis.call('RPUSH', list, id .. '|' .. rec.p)
  end
  put_rec(g, id, rec)
  invalidate = true
  changed = true
end

local function delay_until(g, id, rec, due)
  rec.s = 'D'
  rec.t = rec.t + 1
  put_rec(g, id, rec)
  redis.call('ZADD', TM, due, timer_member('D', g, id))
  changed = true
end

local function schedule(g, id, rec)
  if rec.d > NOW then
    delay_until(g, id, rec, rec.d)
  else
    make_ready(g, id, rec, false)
  end
end

-- Takes an in-flight entry off its consumer and deadline.
local function leave_flight(g, id, rec)
  if rec.ta == 1 then
    redis.call('ZREM', TM, timer_member('A', g, id))
    rec.ta = 0
  end
  if rec.c ~= '' then
    inflight_add(g, rec.c, -1)
  end
  rec.c = ''
  rec.s = ''
end

-- Moves the PEL entry of an entry that left flight without finishing to
-- the parked consumer, with the delivery count set to its attempts.
local function park(g, id, rec)
  if pending_reads[g .. '\0' .. rec.l] then
    flush_reads(g .. '\0' .. rec.l)
  end
  redis.call('XCLAIM', stream(rec.l), g, PARKED, 0, id,
             'RETRYCOUNT', rec.a, 'JUSTID')
end

local function show_next(g, key)
  local waiting = gkey(g, 'kw:' .. key)
  while true do
    local next_id = redis.call('LPOP', waiting)
    if not next_id then
      redis.call('HDEL', gkey(g, 'kh'), key)
      return
    end
    local rec = get_rec(g, next_id)
    local fields = nil
    if rec and rec.s == 'H' and rec.r == 0 then
      -- Not read yet: its due and expiry times are in its fields. It
      -- joins the lane's tail now, as a read entry would; the group's
      -- stream reading skips it when it gets there.
      fields = load_fields(next_id, rec.l, rec.rd)
      if fields and rec.rv ~= 1 then
        rec.d = tonumber(field(fields, 'd')) or 0
        rec.x = tonumber(field(fields, 'x')) or 0
      elseif not fields then
        del_rec(g, next_id)
      end
    end
    if rec and rec.s == 'H' and (rec.r == 1 or fields) then
      redis.call('HSET', gkey(g, 'kh'), key, next_id)
      schedule(g, next_id, rec)
      invalidate = true
      return
    end
  end
end

local retained = nil

local group_names = nil

local function all_groups()
  if not group_names then
    group_names = redis.call('HKEYS', GROUPS)
  end
  return group_names
end

-- Deletes an entry's stream entry, and the markers groups keep of it.
local function delete_entry(id, lane, redriven)
  defer_del(lane, id)
  if redriven == 1 then
    redis.call('HDEL', RD, id)
  end
  local groups = all_groups()
  if #groups > 1 then
    for _, g in ipairs(groups) do
      if get_rec(g, id) then
        del_rec(g, id)
      end
    end
  end
end

-- Deletes an entry no group needs any more, unless retention keeps it;
-- returns whether it did.
local function maybe_delete(id, lane, redriven)
  if retained == nil then
    retained = redis.call('EXISTS', RET) == 1
  end
  if retained then
    local member = lane .. '|' .. id
    local until_ms = redis.call('ZSCORE', RET, member)
    if until_ms and tonumber(until_ms) > NOW then
      return false
    end
    if until_ms then
      redis.call('ZREM', RET, member)
    end
  end
  delete_entry(id, lane, redriven)
  return true
end

-- Removes an entry from its group and shows the next one of its key.
finish = function(g, id, rec)
  local lane = rec.l
  if rec.s == 'R' then
    redis.call('LREM', gkey(g, 'rq:' .. lane), 1, id .. '|' .. rec.p)
    rq_heads[g .. '\0' .. lane] = nil
  elseif rec.s == 'D' then
    redis.call('ZREM', TM, timer_member('D', g, id))
  elseif rec.s == 'F' then
    leave_flight(g, id, rec)
  elseif rec.s == 'H' then
    redis.call('LREM', gkey(g, 'kw:' .. rec.k), 1, id)
  end
  del_rec(g, id)
  if rec.e == 1 then
    redis.call('HDEL', gkey(g, 'err'), id)
  end
  defer_ack(lane, g, id)
  if rec.k ~= '' and redis.call('HGET', gkey(g, 'kh'), rec.k) == id then
    show_next(g, rec.k)
  end
  local deleted = false
  if set_refs(id, get_refs(id) - 1) <= 0 then
    deleted = maybe_delete(id, lane, rec.rd)
  end
  if rec.r == 0 and not deleted then
    -- Finished before the group read it: with this marker, the group's
    -- stream reading skips the entry.
    put_rec(g, id, {s = 'X', t = rec.t, a = 0, l = lane, k = '', r = 0,
                    c = '', p = 0, d = 0, x = 0, rd = 0})
  end
  changed = true
end

dead_letter = function(g, id, rec, reason)
  local err = redis.call('HGET', gkey(g, 'err'), id) or ''
  local fields = load_fields(id, rec.l, rec.rd)
  local args = {'XADD', DLQ, '*', 'id', id, 'g', g, 'why', reason,
                'n', rec.a, 'err', err, 'l', rec.l}
  if fields then
    for i = 1, #fields, 2 do
      if ENTRY_FIELDS[fields[i]] then
        args[#args + 1] = fields[i]
        args[#args + 1] = fields[i + 1]
      end
    end
  end
  redis.call(unpack(args))
  count('dead_lettered')
  count('dead_lettered.' .. reason)
  gcount(g, 'dead_lettered')
  if reason ~= 'rejected' and reason ~= 'max_attempts' then
    -- The others come from a nack, which counted the error already.
    gcount(g, 'errors')
  end
  finish(g, id, rec)
end

local function exhausted(g, attempts)
  local limit = tonumber(redis.call('HGET', GROUPS, g))
  if not limit and cfg.max_attempts > 0 then
    limit = cfg.max_attempts
  end
  return limit ~= nil and attempts >= limit
end

local function set_error(g, id, rec, text)
  redis.call('HSET', gkey(g, 'err'), id, '=' .. text)
  rec.e = 1
end

-- Counts a delivered message put back for another delivery: after a
-- nack with requeue, a missed ack deadline or the close of the consumer
-- that held it (a release of unseen messages is not one).
local function count_redelivery(g)
  count('redelivered')
  gcount(g, 'redelivered')
end

local function expire(g, id, rec)
  if cfg.on_expire == 'dead_letter' then
    set_error(g, id, rec, 'ttl passed before delivery')
    dead_letter(g, id, rec, 'expired')
  else
    count('expired')
    finish(g, id, rec)
  end
end

-- Timers and retention.

-- `claimed`: XAUTOCLAIM moved its PEL entry to the parked consumer
-- already, with the delivery count unchanged (JUSTID).
local function missed_deadline(g, id, rec, claimed)
  leave_flight(g, id, rec)
  set_error(g, id, rec, 'ack deadline passed')
  on_failure(g, rec.l)
  if exhausted(g, rec.a) then
    dead_letter(g, id, rec, 'ack_timeout')
  else
    count_redelivery(g)
    if not claimed then
      park(g, id, rec)
    end
    make_ready(g, id, rec, false)
  end
end

-- Groups with a delivery past its ack deadline, found by the timers of
-- this call; reclaim takes their deliveries back.
local overdue = {}

-- Takes back every delivery of group `g` whose ack deadline passed, with
-- XAUTOCLAIM (min idle CLAIM_IDLE_MS, see set_deadline) to the parked
-- consumer, lane by lane, then makes them ready again or dead-letters
-- them at max_attempts. Returns nothing; a delivery it missed (its PEL
-- deadline can be up to 1 ms later than the record's) stays for
-- fire_overdue.
local function reclaim(g)
  save_stream_ops()
  for _, lane in ipairs(cfg.lanes) do
    local start = '0-0'
    -- NOTE: each XAUTOCLAIM call scans at most 10 x COUNT PEL entries;
    -- past 100 calls the rest waits for the fallback in fire_overdue.
    for _ = 1, 100 do
      local got = redis.call('XAUTOCLAIM', stream(lane), g, PARKED,
                             CLAIM_IDLE_MS, start, 'COUNT', 1000, 'JUSTID')
      start = got[1]
      local ids = got[2]
      -- Redis 7 also lists the PEL entries whose stream entry was
      -- deleted (trimmed), and drops them from the PEL.
      for _, deleted in ipairs(got[3] or {}) do
        ids[#ids + 1] = deleted
      end
      for _, id in ipairs(ids) do
        local rec = get_rec(g, id)
        if rec and rec.s == 'F' then
          missed_deadline(g, id, rec, true)
        end
      end
      if start == '0-0' then
        break
      end
    end
  end
end

-- Handles a deadline timer of an in-flight entry. One that extend moved
-- later keeps waiting, on a timer of its own.
local function check_deadline(g, id, rec)
  if rec.dl <= NOW then
    overdue[g] = overdue[g] or {}
    table.insert(overdue[g], id)
  elseif rec.ta ~= 1 then
    rec.ta = 1
    put_rec(g, id, rec)
    redis.call('ZADD', TM, rec.dl, timer_member('A', g, id))
  end
end

local function fire_batch(g, batch)
  local list = P .. 'dl:' .. batch
  local items = redis.call('LRANGE', list, 0, -1)
  redis.call('DEL', list)
  local ids, tickets = {}, {}
  for i, item in ipairs(items) do
    local bar = string.find(item, '|', 1, true)
    ids[i] = string.sub(item, 1, bar - 1)
    tickets[i] = tonumber(string.sub(item, bar + 1))
  end
  load_recs(g, ids)
  for i, id in ipairs(ids) do
    local rec = get_rec(g, id)
    if rec and rec.s == 'F' and rec.t == tickets[i] then
      check_deadline(g, id, rec)
    end
  end
end

-- Reclaims the overdue deliveries that the timers found; one that
-- XAUTOCLAIM did not take (see reclaim) is taken back directly.
local function fire_overdue()
  for g, ids in pairs(overdue) do
    reclaim(g)
    for _, id in ipairs(ids) do
      local rec = get_rec(g, id)
      if rec and rec.s == 'F' and rec.dl <= NOW then
        missed_deadline(g, id, rec, false)
      end
    end
  end
  overdue = {}
end

local lease_ended

-- Timers that one call fires: batches of FIRE_BATCH until FIRE_MAX,
-- and a batch that ends inside a group of equal times takes up to
-- FIRE_MAX more (due_timers), so at most twice FIRE_MAX. Redis runs
-- nothing else while a script runs: 50,000 timers due at once took
-- 0.26 s in one call (Redis 7.0.15, 2-vCPU guest). The rest fire in the
-- next calls, which a waiting consumer makes at once (next_wake returns
-- 0 while a timer is due).
local FIRE_BATCH = 200
local FIRE_MAX = 2000

-- Returns the due timers to fire now, at most about FIRE_BATCH plus
-- the rest of the last time's group, in firing order: by time, then by
-- kind, then by the id's numbers (time, then sequence) or text. Redis
-- orders timers of equal time by their text, in which "<ms>-10" comes
-- before "<ms>-9", so the delayed messages of one publish_many came out
-- of order. A group of equal times is taken whole (up to FIRE_MAX
-- timers), so that the next batch does not start inside it.
-- NOTE: of a larger group, each call takes the FIRE_MAX first in text
-- order and sorts those, so publish order holds only within each call.
local function due_timers()
  local raw = redis.call('ZRANGEBYSCORE', TM, '-inf', NOW, 'WITHSCORES',
                         'LIMIT', 0, FIRE_BATCH)
  local due, seen = {}, {}
  for i = 1, #raw, 2 do
    due[#due + 1] = {raw[i], tonumber(raw[i + 1])}
    seen[raw[i]] = true
  end
  if #due == FIRE_BATCH then
    local last = due[#due][2]
    local group = redis.call('ZRANGEBYSCORE', TM, last, last,
                             'LIMIT', 0, FIRE_MAX)
    for _, member in ipairs(group) do
      if not seen[member] then
        due[#due + 1] = {member, last}
      end
    end
  end
  for _, timer in ipairs(due) do
    local member = timer[1]
    local bar = string.find(member, '|', 2, true)
    local ms, seq = string.match(string.sub(member, 2, bar - 1),
                                 '^(%d+)-(%d+)$')
    timer[3] = string.sub(member, 1, 1)
    timer[4] = tonumber(ms) or -1
    timer[5] = tonumber(seq) or -1
  end
  -- Fields 2 to 5 in turn: time, kind, the id's time and sequence.
  table.sort(due, function(a, b)
    for key = 2, 5 do
      if a[key] ~= b[key] then
        return a[key] < b[key]
      end
    end
    return a[1] < b[1]
  end)
  return due
end

local function fire()
  -- Leases end after the deadlines, so that a consumer's deliveries that
  -- are overdue go back before it is checked.
  local leases = {}
  local fired = 0
  while fired < FIRE_MAX do
    local due = due_timers()
    if #due == 0 then
      break
    end
    fired = fired + #due
    for _, timer in ipairs(due) do
      local member = timer[1]
      redis.call('ZREM', TM, member)
      changed = true
      local kind = timer[3]
      local bar = string.find(member, '|', 2, true)
      local id = string.sub(member, 2, bar - 1)
      local g = string.sub(member, bar + 1)
      if kind == 'B' then
        fire_batch(g, id)
      elseif kind == 'L' then
        leases[#leases + 1] = {g, id}
      else
        local rec = get_rec(g, id)
        if rec and kind == 'D' and rec.s == 'D' then
          make_ready(g, id, rec, false)
        elseif rec and kind == 'A' and rec.s == 'F' then
          rec.ta = 0
          check_deadline(g, id, rec)
        end
      end
    end
  end
  fire_overdue()
  for _, lease in ipairs(leases) do
    lease_ended(lease[1], lease[2])
  end
end

local function trim_retained()
  local due = redis.call('ZRANGEBYSCORE', RET, '-inf', NOW,
                         'LIMIT', 0, 500)
  for _, member in ipairs(due) do
    redis.call('ZREM', RET, member)
    local bar = string.find(member, '|', 1, true)
    local id = string.sub(member, bar + 1)
    if get_refs(id) <= 0 then
      delete_entry(id, string.sub(member, 1, bar - 1), 1)
      for _, g in ipairs(all_groups()) do
        if get_rec(g, id) then
          del_rec(g, id)
        end
      end
    end
  end
end

local function stored_count()
  save_stream_ops()
  local total = redis.call('HLEN', RD)
  for _, lane in ipairs(cfg.lanes) do
    total = total + redis.call('XLEN', stream(lane))
  end
  return total
end

local function last_id()
  local state = id_state()
  return string.format('%d-%d', state.ms, state.seq)
end

local function cursor(g, lane)
  local name = g .. '\0' .. lane
  local value = cursors[name]
  if not value then
    value = redis.call('HGET', gkey(g, 'sch'), 'c' .. lane) or '0-0'
    cursors[name] = value
  end
  return value
end

local function unread(g, id, lane)
  return seq_of(id) > seq_of(cursor(g, lane))
end

-- Publishing.

-- Enters a new entry into a group: it counts as needed by the group and
-- waits behind an older entry of its key.
local function enter(g, id, lane, key)
  set_refs(id, get_refs(id) + 1)
  if key == '' then
    return
  end
  local head = gkey(g, 'kh')
  if redis.call('HEXISTS', head, key) == 1 then
    put_rec(g, id, {s = 'H', t = 0, a = 0, l = lane, k = key, r = 0,
                    c = '', p = 0, d = 0, x = 0, rd = 0})
    redis.call('RPUSH', gkey(g, 'kw:' .. key), id)
  else
    redis.call('HSET', head, key, id)
  end
end

-- Removes a stored entry from every group and from its stream.
local function drop_entry(id, lane, groups)
  local fields = load_fields(id, lane, 0) or {}
  for _, g in ipairs(groups) do
    local rec = get_rec(g, id)
    if not rec and unread(g, id, lane) then
      rec = new_rec(lane, fields)
      rec.r = 0
    end
    if rec then
      finish(g, id, rec)
    end
  end
  for _, g in ipairs(groups) do
    if get_rec(g, id) then
      del_rec(g, id)
    end
  end
  save_stream_ops()
  redis.call('XDEL', stream(lane), id)
  set_refs(id, 0)
  redis.call('HDEL', RD, id)
  redis.call('ZREM', RET, lane .. '|' .. id)
end

-- Drops the oldest stored entry that no group has in flight.
-- NOTE: looks at the 64 oldest entries of each lane only.
local function drop_oldest(groups)
  save_stream_ops()
  local found = {}
  for _, lane in ipairs(cfg.lanes) do
    for _, entry in ipairs(redis.call('XRANGE', stream(lane), '-', '+',
                                      'COUNT', 64)) do
      found[#found + 1] = {seq_of(entry[1]), entry[1], lane}
    end
  end
  table.sort(found, function(a, b) return a[1] < b[1] end)
  for _, item in ipairs(found) do
    local busy = false
    for _, g in ipairs(groups) do
      local rec = get_rec(g, item[2])
      if rec and rec.s == 'F' then
        busy = true
        break
      end
    end
    if not busy then
      drop_entry(item[2], item[3], groups)
      count('dropped_full')
      return true
    end
  end
  return false
end

local function next_id()
  local state = id_state()
  state.ms = math.max(state.ms, math.floor(NOW))
  state.seq = state.seq + 1
  state.dirty = true
  return string.format('%d-%d', state.ms, state.seq)
end

-- Gives back the id that next_id returned last, unused.
local function unuse_id()
  local state = id_state()
  state.seq = state.seq - 1
end

-- Returns the XADD arguments shared by a run of messages, built once per
-- run, and the positions of the id and the body in them.
local function xadd_template(meta, lane, maxlen)
  if meta.args then
    return meta.args, meta.id_at
  end
  local args = {'XADD', stream(lane)}
  if maxlen > 0 then
    args[#args + 1] = 'MAXLEN'
    args[#args + 1] = '~'
    args[#args + 1] = maxlen
  end
  meta.id_at = #args + 1
  args[#args + 1] = ''
  args[#args + 1] = 'b'
  args[#args + 1] = ''
  args[#args + 1] = 'p'
  args[#args + 1] = meta.priority
  args[#args + 1] = 't'
  args[#args + 1] = string.format('%.3f', NOW)
  if meta.ttl > 0 then
    args[#args + 1] = 'x'
    args[#args + 1] = string.format('%.3f', NOW + meta.ttl)
  end
  if meta.delay > 0 then
    args[#args + 1] = 'd'
    args[#args + 1] = string.format('%.3f', NOW + meta.delay)
  end
  for _, name in ipairs(meta.optional) do
    args[#args + 1] = name
    args[#args + 1] = meta[name]
  end
  meta.args = args
  return args, meta.id_at
end

-- Stores one message under `id`, from next_id.
local function add_message(meta, body, maxlen, groups, id)
  local key = meta.key
  local lane = lane_of(meta.priority)
  local args, id_at = xadd_template(meta, lane, maxlen)
  args[id_at] = id
  args[id_at + 2] = body
  redis.call(unpack(args))
  refs_cache[id] = 0
  count('published')
  if #groups == 0 then
    redis.call('ZADD', RET, FAR, lane .. '|' .. id)
    retained = true
  else
    if cfg.retention_ms > 0 then
      redis.call('ZADD', RET, NOW + cfg.retention_ms, lane .. '|' .. id)
      retained = true
    end
    for _, g in ipairs(groups) do
      enter(g, id, lane, key)
    end
    if #groups == 1 and cfg.retention_ms == 0 then
      -- The one group's need is implicit (see P refs above).
      refs_cache[id] = 0
      refs_dirty[id] = nil
      refs_absent[id] = true
    end
  end
  changed = true
end

-- Reads the settings shared by one run of messages, at ARGV[base].
local function run_meta(base)
  local meta = {dedup = ARGV[base + 1], key = ARGV[base + 2],
                priority = tonumber(ARGV[base + 3]),
                delay = tonumber(ARGV[base + 4]), e = ARGV[base + 6],
                k = ARGV[base + 2], h = ARGV[base + 7], hp = ARGV[base + 8],
                r = ARGV[base + 9], c = ARGV[base + 10], optional = {}}
  local ttl = ARGV[base + 5]
  meta.ttl = (ttl ~= '' and tonumber(ttl)) or cfg.ttl_ms
  for _, name in ipairs({'e', 'k', 'h', 'hp', 'r', 'c'}) do
    if meta[name] ~= '' then
      meta.optional[#meta.optional + 1] = name
    end
  end
  return meta
end

local RUN_HEADER = 11

-- Claims a dedup id for `id` with SET NX, so that one command both tests
-- and sets it. Returns nil when it claimed it, else the message id stored
-- under it. PX, not EX: dedup windows are float seconds, and EX would
-- round a window below one second to zero or one.
local function claim_dedup(dedup_key, id)
  local ms = math.max(1, math.ceil(cfg.dedup_ms))
  if redis.call('SET', dedup_key, id, 'NX', 'PX', ms) then
    return nil
  end
  return redis.call('GET', dedup_key)
end

-- ARGV: op, run count, stream maxlen (0: none), then per run of messages
-- with equal settings: message count, dedup token, key token, priority,
-- delay ms, ttl ms ("" for the topic's), body encoding, headers (JSON),
-- headers (pickle), reply_to, correlation id, the body lengths in bytes
-- joined by spaces, and the bodies joined into one string. "" marks an
-- absent value. Replies 'OK', 'FULL' or 'BLOCK', the count of ids, and
-- the ids of the messages stored or deduplicated, joined by spaces.
local function publish()
  local runs = tonumber(ARGV[2])
  local maxlen = tonumber(ARGV[3])
  local groups = redis.call('HKEYS', GROUPS)
  local stored = 0
  if cfg.maxsize > 0 then
    stored = stored_count()
  end
  local ids = {}
  local base = 4
  local function reply(status)
    return {status, #ids, table.concat(ids, ' ')}
  end
  for _ = 1, runs do
    local n = tonumber(ARGV[base])
    local meta = run_meta(base)
    local dedup_key = P .. 'dd:' .. meta.dedup
    local dedup = meta.dedup ~= '' and cfg.dedup_ms > 0
    local bodies = ARGV[base + RUN_HEADER + 1]
    local at = 1
    local body_count = 0
    for length in string.gmatch(ARGV[base + RUN_HEADER], '%d+') do
      body_count = body_count + 1
      local body = string.sub(bodies, at, at + length - 1)
      at = at + length
      local id = next_id()
      local seen = dedup and claim_dedup(dedup_key, id)
      if seen then
        unuse_id()
        count('deduplicated')
        ids[#ids + 1] = seen
      else
        if cfg.maxsize > 0 and stored >= cfg.maxsize then
          local blocked = cfg.when_full ~= 'drop_oldest'
            or not drop_oldest(groups)
          if blocked then
            unuse_id()
            if dedup then
              redis.call('DEL', dedup_key)
            end
            return reply(cfg.when_full == 'raise' and 'FULL' or 'BLOCK')
          end
          stored = stored - 1
        end
        add_message(meta, body, maxlen, groups, id)
        stored = stored + 1
        ids[#ids + 1] = id
      end
    end
    if body_count ~= n or at ~= #bodies + 1 then
      return redis.error_reply('MQS_BUG publish run of ' .. n ..
                               ' bodies is malformed')
    end
    base = base + RUN_HEADER + 2
  end
  return reply('OK')
end

-- Groups and consumers.

-- Gives the entries published before the first group their retention,
-- or drops them when the group starts at "latest" without retention.
local function end_backlog()
  local keep = cfg.retention_ms
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', RET, FAR, '+inf')) do
    if keep > 0 then
      redis.call('ZADD', RET, NOW + keep, member)
      retained = true
    else
      redis.call('ZREM', RET, member)
      local bar = string.find(member, '|', 1, true)
      local id = string.sub(member, bar + 1)
      if get_refs(id) <= 0 then
        defer_del(string.sub(member, 1, bar - 1), id)
        count('dropped_unsubscribed')
      end
    end
  end
end

-- Enters the record of an entry into group `g`: behind the visible
-- entry of its key, or else ready in its lane. A redriven entry goes to
-- the tail of either; one given back unseen (`front`) to the head.
local function enter_record(g, id, rec, front)
  local key = rec.k
  local head = gkey(g, 'kh')
  if key ~= '' and redis.call('HEXISTS', head, key) == 1 then
    rec.s = 'H'
    put_rec(g, id, rec)
    redis.call(front and 'LPUSH' or 'RPUSH', gkey(g, 'kw:' .. key), id)
    return
  end
  if key ~= '' then
    redis.call('HSET', head, key, id)
  end
  make_ready(g, id, rec, front or false)
end

-- Enters the redriven entries whose stream entry is gone into a new
-- group, after the stream's entries, as the memory backend does.
local function enter_redriven(g)
  local copies = redis.call('HGETALL', RD)
  local found = {}
  for i = 1, #copies, 2 do
    found[#found + 1] = {seq_of(copies[i]), copies[i],
                         cmsgpack.unpack(copies[i + 1])}
  end
  table.sort(found, function(a, b) return a[1] < b[1] end)
  for _, item in ipairs(found) do
    local id, fields = item[2], item[3]
    local key = field(fields, 'k') or ''
    local rec = {s = '', t = 0, a = 0,
                 l = lane_of(tonumber(field(fields, 'p'))), k = key, r = 1,
                 c = '', p = 0, d = 0, x = 0, rd = 1, rv = 1}
    set_refs(id, get_refs(id) + 1)
    enter_record(g, id, rec)
  end
end

-- Sets the reference count of a stored entry to the number of `groups`
-- that still need it: those holding a record of it, other than a
-- finished-unread marker, and those that have not read it yet.
local function recount_refs(id, lane, groups)
  local n = 0
  for _, g in ipairs(groups) do
    local rec = get_rec(g, id)
    if rec and rec.s ~= 'X' or not rec and unread(g, id, lane) then
      n = n + 1
    end
  end
  set_refs(id, n)
end

local function create_group(g, start)
  local first = redis.call('HLEN', GROUPS) == 0
  redis.call('HSET', GROUPS, g, '')
  local start_id = '0-0'
  if start ~= 'earliest' then
    start_id = last_id()
  end
  for _, lane in ipairs(cfg.lanes) do
    local made = redis.pcall('XGROUP', 'CREATE', stream(lane), g, start_id,
                             'MKSTREAM')
    if type(made) == 'table' and made.err then
      redis.call('XGROUP', 'SETID', stream(lane), g, start_id)
    end
    redis.call('HSET', gkey(g, 'sch'), 'c' .. lane, start_id)
    cursors[g .. '\0' .. lane] = start_id
  end
  if start == 'earliest' then
    save_stream_ops()
    local stored = {}
    for _, lane in ipairs(cfg.lanes) do
      for _, entry in ipairs(redis.call('XRANGE', stream(lane), '-', '+')) do
        stored[#stored + 1] = {seq_of(entry[1]), entry[1], lane,
                               field(entry[2], 'k') or ''}
      end
    end
    table.sort(stored, function(a, b) return a[1] < b[1] end)
    local others = {}
    for _, name in ipairs(redis.call('HKEYS', GROUPS)) do
      if name ~= g then
        others[#others + 1] = name
      end
    end
    for _, item in ipairs(stored) do
      recount_refs(item[2], item[3], others)
      enter(g, item[2], item[3], item[4])
    end
    enter_redriven(g)
  end
  if first then
    end_backlog()
  end
end

-- ARGV: op, group, consumer, start, prefetch, max_attempts ("" none),
-- lease ms (absent or "": none, the consumer stays until closed).
local function open_consumer()
  local g, consumer = ARGV[2], ARGV[3]
  if redis.call('HEXISTS', GROUPS, g) == 0 then
    create_group(g, ARGV[4])
  end
  if ARGV[6] ~= '' then
    redis.call('HSET', GROUPS, g, ARGV[6])
  end
  redis.call('HSET', gkey(g, 'cons'), consumer, ARGV[5])
  local lease = tonumber(ARGV[7] or '')
  if lease then
    redis.call('HSET', gkey(g, 'ls'), consumer, lease)
    redis.call('ZADD', TM, NOW + lease, timer_member('L', g, consumer))
  end
  changed = true
  return {'OK'}
end

-- Moves the end of the lease of `consumer` to `lease` ms from now. It is
-- moved once a third of the lease passed, so that a consumer waiting in
-- a series of fetches writes once per third of its lease. A consumer
-- without a lease timer (closed, removed, or opened without a lease)
-- gets none.
local function renew_lease(g, consumer, lease)
  local member = timer_member('L', g, consumer)
  local ends = tonumber(redis.call('ZSCORE', TM, member))
  if ends and ends < NOW + lease * 2 / 3 then
    redis.call('ZADD', TM, NOW + lease, member)
  end
end

-- Deletes the fields of `consumer` in group `g`, its lease timer and its
-- consumer in each lane's stream group. Its deliveries must have left
-- flight already: their PEL entries then belong to the parked consumer.
local function forget_consumer(g, consumer)
  for _, name in ipairs({'cons', 'inf', 'lf', 'ls'}) do
    redis.call('HDEL', gkey(g, name), consumer)
  end
  redis.call('ZREM', TM, timer_member('L', g, consumer))
  group_table(inflight_delta, g)[consumer] = nil
  save_stream_ops()
  for _, lane in ipairs(cfg.lanes) do
    -- XGROUP DELCONSUMER drops the consumer's PEL entries, so it runs
    -- only when there are none.
    local pending = redis.pcall('XPENDING', stream(lane), g, '-', '+', 1,
                                consumer)
    if type(pending) == 'table' and not pending.err and #pending == 0 then
      redis.pcall('XGROUP', 'DELCONSUMER', stream(lane), g, consumer)
    end
  end
end

-- Handles the end of the lease of `consumer`: one that holds deliveries
-- (their deadline was extended) is checked again after another lease;
-- one that holds none is removed and counted.
lease_ended = function(g, consumer)
  if redis.call('HEXISTS', gkey(g, 'cons'), consumer) == 0 then
    redis.call('HDEL', gkey(g, 'ls'), consumer)
    return
  end
  if inflight(g, consumer) > 0 then
    local lease = tonumber(redis.call('HGET', gkey(g, 'ls'), consumer))
    redis.call('ZADD', TM, NOW + (lease or 60000),
               timer_member('L', g, consumer))
    return
  end
  forget_consumer(g, consumer)
  count('consumers_expired')
end

local function ids_by_seq(ids)
  table.sort(ids, function(a, b) return seq_of(a) < seq_of(b) end)
  return ids
end

-- ARGV: op, group, consumer.
local function close_consumer()
  local g, consumer = ARGV[2], ARGV[3]
  if redis.call('HDEL', gkey(g, 'cons'), consumer) == 0 then
    return {'OK', 0}
  end
  save_recs()
  local held = {}
  local raw = redis.call('HGETALL', gkey(g, 'st'))
  for i = 1, #raw, 2 do
    local rec = unpack_rec(raw[i + 1])
    if rec.s == 'F' and rec.c == consumer then
      held[#held + 1] = raw[i]
    end
  end
  local returned = 0
  for _, id in ipairs(ids_by_seq(held)) do
    local rec = get_rec(g, id)
    leave_flight(g, id, rec)
    count_redelivery(g)
    park(g, id, rec)
    make_ready(g, id, rec, false)
    returned = returned + 1
  end
  forget_consumer(g, consumer)
  changed = true
  return {'OK', returned}
end

-- Delivering.

-- Reads the entry at the head of a lane's unread part into the PEL of
-- `consumer`; returns its id.
local function read_next(g, lane, consumer)
  local name = g .. '\0' .. lane
  if pending_reads[name] then
    flush_reads(name)
  end
  local got = redis.call('XREADGROUP', 'GROUP', g, consumer, 'COUNT', 1,
                         'STREAMS', stream(lane), '>')
  local id = got[1][2][1][1]
  cursors[name] = id
  dirty_cursors[name] = {g, lane}
  return id
end

-- Takes the peeked head of a lane for `consumer`, reading it into the
-- consumer's PEL with the next flush.
local function read_deferred(g, lane, consumer, id)
  local name = g .. '\0' .. lane
  local read = pending_reads[name]
  if read and read.consumer ~= consumer then
    flush_reads(name)
    read = nil
  end
  if not read then
    read = {g = g, lane = lane, consumer = consumer, n = 0}
    pending_reads[name] = read
  end
  read.n = read.n + 1
  read.last = id
  cursors[name] = id
  dirty_cursors[name] = {g, lane}
  peeks[name].i = peeks[name].i + 1
end

-- Returns the next unread entry of a lane's stream for the group, or
-- nil, from a buffer of entries peeked ahead.
local function peek(g, lane)
  local name = g .. '\0' .. lane
  local buffer = peeks[name]
  if buffer and buffer.i <= #buffer.entries then
    return buffer.entries[buffer.i]
  end
  if buffer and buffer.ended then
    return nil
  end
  save_stream_ops()
  local from = '(' .. cursor(g, lane)
  -- The first peek of a lane in a call reads one entry: a fetch that
  -- takes the lane's entries in bulk (read_bulk) rereads them anyway.
  local n = buffer and 32 or 1
  buffer = {i = 1, entries = redis.call('XRANGE', stream(lane), from, '+',
                                        'COUNT', n)}
  peeks[name] = buffer
  return buffer.entries[1]
end

-- Peeks the first unread entry of each lane of `g` without a buffer.
-- One HMGET of the cursors and one XREAD replace an HGET and an XRANGE
-- per lane, 20 calls on a topic with the 10 default lanes. A lane found
-- empty stays empty for the rest of the call, because only a publish
-- adds stream entries and a fetch publishes nothing.
local function peek_lanes(g)
  local lanes = {}
  for _, lane in ipairs(cfg.lanes) do
    if not peeks[g .. '\0' .. lane] then
      lanes[#lanes + 1] = lane
    end
  end
  if #lanes < 2 then
    return
  end
  save_stream_ops()
  local load = {'HMGET', gkey(g, 'sch')}
  for _, lane in ipairs(lanes) do
    if not cursors[g .. '\0' .. lane] then
      load[#load + 1] = 'c' .. lane
    end
  end
  if #load > 2 then
    local loaded = redis.call(unpack(load))
    local k = 0
    for _, lane in ipairs(lanes) do
      local name = g .. '\0' .. lane
      if not cursors[name] then
        k = k + 1
        cursors[name] = loaded[k] or '0-0'
      end
    end
  end
  local args = {'XREAD', 'COUNT', 1, 'STREAMS'}
  for _, lane in ipairs(lanes) do
    args[#args + 1] = stream(lane)
  end
  for _, lane in ipairs(lanes) do
    args[#args + 1] = cursors[g .. '\0' .. lane]
  end
  local first = {}
  for _, pair in ipairs(redis.call(unpack(args)) or {}) do
    first[pair[1]] = pair[2][1]
  end
  for _, lane in ipairs(lanes) do
    local entry = first[stream(lane)]
    peeks[g .. '\0' .. lane] = {i = 1, entries = {entry},
                                ended = entry == nil}
  end
end

-- Reads the peeked head of a lane's unread part into the PEL of
-- `consumer`.
local function read_peeked(g, lane, consumer, id)
  local got = read_next(g, lane, consumer)
  local buffer = peeks[g .. '\0' .. lane]
  if got ~= id then
    error('MQS_BUG read ' .. got .. ' after peeking ' .. id)
  end
  buffer.i = buffer.i + 1
end

-- Handles an entry just read from its stream that cannot be delivered
-- now: `rec` is its record (hidden behind its key, or handled while
-- still unread), or nil for an entry delayed into the future. Its PEL
-- entry goes to the owner its record names, with its attempts as the
-- delivery count.
local function park_unready(g, lane, id, fields, rec)
  if not rec then
    redis.call('XCLAIM', stream(lane), g, PARKED, 0, id,
               'RETRYCOUNT', 0, 'JUSTID')
    delay_until(g, id, new_rec(lane, fields),
                tonumber(field(fields, 'd')))
    return
  end
  if rec.s == 'X' then
    defer_ack(lane, g, id)
    del_rec(g, id)
    return
  end
  if rec.s == 'H' and rec.rv ~= 1 then
    rec.d = tonumber(field(fields, 'd')) or 0
    rec.x = tonumber(field(fields, 'x')) or 0
  end
  rec.r = 1
  local owner = PARKED
  if rec.s == 'F' then
    owner = rec.c
  end
  redis.call('XCLAIM', stream(lane), g, owner, 0, id,
             'RETRYCOUNT', rec.a, 'JUSTID')
  put_rec(g, id, rec)
end

local function rq_head(g, lane)
  local name = g .. '\0' .. lane
  local head = rq_heads[name]
  if head == nil then
    head = redis.call('LINDEX', gkey(g, 'rq:' .. lane), 0)
    rq_heads[name] = head
  end
  return head
end

-- Entries that a fetch may handle without delivering them (expired,
-- dead-lettered or parked) before it returns what it has. Redis runs no
-- other command while a script runs, so this bounds how long one call
-- blocks the server. The client calls again at once (wake in 0 ms).
local FETCH_WORK = 1000
local fetch_work = 0
local out_of_work = false

-- Returns the next deliverable entry of a lane: 'q', id (from the ready
-- list) or 's', id, fields (from the stream), or nil. Hidden and delayed
-- entries met at the head of the stream are parked on the way.
local function candidate(g, lane)
  local sid, sfields
  while true do
    if fetch_work >= FETCH_WORK then
      -- Entries older than the list's head may wait in the stream, so
      -- the lane has no candidate before the next call.
      out_of_work = true
      return nil
    end
    local found = peek(g, lane)
    if not found then
      sid = nil
      break
    end
    sid, sfields = found[1], found[2]
    -- Only an entry with a key can have a record before it is read:
    -- hidden behind its key (H), or shown and then handled while still
    -- unread (R, D, F), or finished so (X).
    local rec = field(sfields, 'k') and get_rec(g, sid)
    if not rec and (tonumber(field(sfields, 'd')) or 0) <= NOW then
      break
    end
    read_peeked(g, lane, PARKED, sid)
    park_unready(g, lane, sid, sfields, rec)
    fetch_work = fetch_work + 1
  end
  local head = rq_head(g, lane)
  if head then
    local bar = string.find(head, '|', 1, true)
    local pos = tonumber(string.sub(head, bar + 1))
    if not sid or seq_of(sid) > pos then
      return {'q', string.sub(head, 1, bar - 1)}
    end
  end
  if sid then
    return {'s', sid, sfields}
  end
  return nil
end

-- Deliveries between latency samples (0: none), from fetch's arguments,
-- and each group's delivered count before this call.
local sample_every = 0
local delivered_before = {}

-- Returns whether the delivery being made is one to sample: every
-- sample_every-th of its group.
sample_due = function(g)
  if sample_every <= 0 then
    return false
  end
  local before = delivered_before[g]
  if not before then
    before = tonumber(redis.call('HGET', gkey(g, 'ctr'), 'delivered')) or 0
    delivered_before[g] = before
  end
  local n = before + group_counts[g].delivered
  return (n - 1) % sample_every == 0
end

-- "id|ticket" of the deliveries of this fetch, which share one timer.
flying = {}

-- Takes the candidate of a lane; returns a delivery, or nil when the
-- entry left instead (expired, or trimmed from its stream).
local function take(g, lane, found, consumer, auto_ack, ack_ms)
  local id, rec, fields = found[2], nil, nil
  if found[1] ~= 'q' then
    -- 's': the peeked head of the stream, to read now; 'r': read already.
    if found[1] == 's' then
      read_deferred(g, lane, consumer, id)
    end
    fields = found[3]
    rec = new_rec(lane, fields)
  else
    redis.call('LPOP', gkey(g, 'rq:' .. lane))
    rq_heads[g .. '\0' .. lane] = nil
    rec = get_rec(g, id)
    rec.s = ''
    fields = load_fields(id, lane, rec.rd)
    if not fields then
      set_error(g, id, rec, 'entry trimmed from the stream while pending')
      dead_letter(g, id, rec, 'trimmed')
      return nil
    end
  end
  if rec.x > 0 and rec.x <= NOW then
    expire(g, id, rec)
    return nil
  end
  if cfg.rate or #cfg.lane_rates > 0 then
    for _, pair in ipairs(buckets_of(g, lane)) do
      refill(pair[1], pair[2])
      pair[1].tok = pair[1].tok - 1
    end
  end
  rec.a = rec.a + 1
  rec.t = rec.t + 1
  count('delivered')
  gcount(g, 'delivered')
  local sampled = sample_due(g)
  if sampled then
    local ready_at = rec.ra
    if found[1] ~= 'q' then
      ready_at = math.max(tonumber(field(fields, 't')) or NOW, rec.d)
    end
    if ready_at then
      record_latency(g, 'e', NOW - ready_at)
    end
  end
  local delivery = {id, rec.t, rec.a, fields}
  if auto_ack then
    count('acked')
    gcount(g, 'acked')
    finish(g, id, rec)
    return delivery
  end
  if found[1] == 'q' then
    redis.call('XCLAIM', stream(lane), g, consumer, 0, id,
               'IDLE', idle_for(ack_ms), 'RETRYCOUNT', rec.a, 'JUSTID')
  else
    set_deadline(g, lane, consumer, id, ack_ms)
  end
  rec.s = 'F'
  rec.c = consumer
  rec.dl = NOW + ack_ms
  rec.ta = nil
  -- da: delivered at, kept for the deliver-to-ack latency of a sample.
  rec.da = sampled and NOW or nil
  put_rec(g, id, rec)
  inflight_add(g, consumer, 1)
  flying[#flying + 1] = id .. '|' .. rec.t
  return delivery
end

-- Reads up to `want` unread entries of a lane into the PEL of `consumer`
-- with one XREADGROUP and delivers the ready ones, appending them to
-- `found`. fetch calls this only while the lane is the one it can deliver
-- from and no rate limit applies, so each entry read is taken in stream
-- order. An entry that became ready again meanwhile (nack, key turn) goes
-- to the lane's list with pos = the newest seq, so it still comes after
-- every entry read here.
local function read_bulk(g, lane, consumer, want, auto_ack, ack_ms, found)
  local name = g .. '\0' .. lane
  if pending_reads[name] then
    flush_reads(name)
  end
  local got = redis.call('XREADGROUP', 'GROUP', g, consumer, 'COUNT', want,
                         'STREAMS', stream(lane), '>')
  peeks[name] = nil
  local entries = got and got[1][2] or {}
  if #entries == 0 then
    return
  end
  cursors[name] = entries[#entries][1]
  dirty_cursors[name] = {g, lane}
  for _, entry in ipairs(entries) do
    local id, fields = entry[1], entry[2]
    local rec = field(fields, 'k') and get_rec(g, id)
    if rec or (tonumber(field(fields, 'd')) or 0) > NOW then
      park_unready(g, lane, id, fields, rec)
      fetch_work = fetch_work + 1
    else
      local delivery = take(g, lane, {'r', id, fields}, consumer, auto_ack,
                            ack_ms)
      if delivery then
        found[#found + 1] = delivery
      else
        fetch_work = fetch_work + 1
      end
    end
  end
end

-- Returns the time (ms from now) of the next timer or rate token, or -1.
local function next_wake(g, waiting_lanes)
  local wake = nil
  local first = redis.call('ZRANGE', TM, 0, 0, 'WITHSCORES')
  if #first > 0 then
    wake = tonumber(first[2])
  end
  for lane, _ in pairs(waiting_lanes) do
    for _, pair in ipairs(buckets_of(g, lane)) do
      local at = bucket_ready_at(pair[1], pair[2])
      if at > NOW and (wake == nil or at < wake) then
        wake = at
      end
    end
  end
  if wake == nil then
    return -1
  end
  return math.max(0, math.ceil(wake - NOW))
end

local function only_lane(eligible)
  local first = next(eligible)
  return first ~= nil and next(eligible, first) == nil
end

-- Puts back the deliveries of timer "B<batch>|G" that `consumer` still
-- holds, unseen, at the head of their lanes, as release does. A fetch
-- whose reply was lost took them, so its retry returns them first.
local function release_batch(g, consumer, batch)
  local taken = {}
  for _, item in ipairs(redis.call('LRANGE', P .. 'dl:' .. batch, 0, -1)) do
    local bar = string.find(item, '|', 1, true)
    local id = string.sub(item, 1, bar - 1)
    local rec = get_rec(g, id)
    if rec and rec.s == 'F' and rec.c == consumer
        and rec.t == tonumber(string.sub(item, bar + 1)) then
      taken[#taken + 1] = {id, rec}
    end
  end
  for i = #taken, 1, -1 do
    local id, rec = taken[i][1], taken[i][2]
    rec.a = rec.a - 1
    leave_flight(g, id, rec)
    park(g, id, rec)
    make_ready(g, id, rec, true)
  end
end

-- ARGV: op, group, consumer, max items, ack timeout ms, auto_ack (1/0),
-- sample_every (0: no latency samples), call id (unique per fetch, the
-- same in its retries; "" for none), lease ms (absent or "": the lease
-- is not renewed; the dispatch renews it).
local function fetch()
  local g, consumer = ARGV[2], ARGV[3]
  sample_every = tonumber(ARGV[7]) or 0
  local prefetch = redis.call('HGET', gkey(g, 'cons'), consumer)
  if not prefetch then
    return redis.error_reply('MQS_SHUTDOWN consumer ' .. consumer ..
                             ' of group ' .. g .. ' is closed or unknown ' ..
                             'to the server (deleted with its topic, or ' ..
                             'lost with the server\'s data); call ' ..
                             'consume again')
  end
  local call_id = ARGV[8] or ''
  if call_id ~= '' then
    -- "<call id> <batch>" of the consumer's last fetch that took
    -- messages: the same call id means that this call is its retry.
    local last = redis.call('HGET', gkey(g, 'lf'), consumer)
    if last then
      local space = string.find(last, ' ', 1, true)
      if string.sub(last, 1, space - 1) == call_id then
        release_batch(g, consumer, string.sub(last, space + 1))
      end
    end
  end
  local auto_ack = ARGV[6] == '1'
  local ack_ms = tonumber(ARGV[5])
  local limit = tonumber(ARGV[4])
  if not auto_ack then
    limit = math.min(limit, tonumber(prefetch) - inflight(g, consumer))
  end
  local found = {}
  local cands = {}
  local waiting = {}
  local rated = cfg.rate or #cfg.lane_rates > 0
  if limit > 0 then
    peek_lanes(g)
  end
  while #found < limit and fetch_work < FETCH_WORK do
    if invalidate then
      cands = {}
      invalidate = false
    end
    local eligible = {}
    local topic_ready = true
    if cfg.rate then
      topic_ready = bucket_ready(bucket(g, 't', cfg.rate), cfg.rate)
    end
    for _, lane in ipairs(cfg.lanes) do
      if cands[lane] == nil then
        cands[lane] = candidate(g, lane) or false
      end
      if cands[lane] then
        local ready = topic_ready
        local rate = lane_rate(lane)
        if ready and rate then
          ready = bucket_ready(bucket(g, 'l' .. lane, rate), rate)
        end
        if ready then
          eligible[lane] = true
        else
          waiting[lane] = true
        end
      end
    end
    if out_of_work then
      break
    end
    local lane = pick(g, eligible)
    if lane == nil then
      break
    end
    local cand = cands[lane]
    cands[lane] = nil
    if cand[1] == 's' and not rated and not next(waiting)
        and not rq_head(g, lane) and only_lane(eligible) then
      read_bulk(g, lane, consumer, limit - #found, auto_ack, ack_ms, found)
    else
      local delivery = take(g, lane, cand, consumer, auto_ack, ack_ms)
      if delivery then
        found[#found + 1] = delivery
      else
        fetch_work = fetch_work + 1
      end
    end
  end
  if fetch_work >= FETCH_WORK then
    out_of_work = true
  end
  if auto_ack and #found > 0 and cfg.maxsize > 0 then
    changed = true
  end
  if #flying > 0 then
    local state = id_state()
    state.batch = state.batch + 1
    state.dirty = true
    local batch = P .. 'dl:' .. state.batch
    call_chunked('RPUSH', batch, flying)
    redis.call('ZADD', TM, NOW + ack_ms, 'B' .. state.batch .. '|' .. g)
    if call_id ~= '' then
      redis.call('HSET', gkey(g, 'lf'), consumer,
                 call_id .. ' ' .. state.batch)
    end
  end
  if out_of_work then
    return {'OK', 0, found}
  end
  return {'OK', next_wake(g, waiting), found}
end

-- Acknowledging.

local function live(g, id, ticket)
  local rec = get_rec(g, id)
  if not rec or rec.s ~= 'F' or rec.t ~= tonumber(ticket) then
    count('late_acks')
    return nil
  end
  return rec
end

local function ack_one(g, id, ticket, retried)
  if retried and not get_rec(g, id) then
    -- The message is finished. This call retries an ack whose reply was
    -- lost, and that ack most likely finished it.
    -- NOTE: it may also have been finished after its ack deadline
    -- passed (acked after a redelivery, dead-lettered or expired).
    return 1
  end
  local rec = live(g, id, ticket)
  if not rec then
    return 0
  end
  count('acked')
  gcount(g, 'acked')
  if rec.da then
    record_latency(g, 'a', NOW - rec.da)
  end
  leave_flight(g, id, rec)
  finish(g, id, rec)
  on_success(g, rec.l)
  return 1
end

-- ARGV: op, group, id, ticket, retried ("1" when this call is a retry
-- after a lost connection, else "0").
local function ack()
  return {'OK', ack_one(ARGV[2], ARGV[3], ARGV[4], ARGV[5] == '1')}
end

-- ARGV: op, group, count, then "id:ticket" per delivery, joined by
-- spaces, and retried (as for ack).
local function ack_many()
  local g, n = ARGV[2], tonumber(ARGV[3])
  local ids, tickets = {}, {}
  for id, ticket in string.gmatch(ARGV[4], '([%d%-]+):(%d+)') do
    ids[#ids + 1] = id
    tickets[#tickets + 1] = ticket
  end
  if #ids ~= n then
    return redis.error_reply('MQS_BUG ack_many got ' .. #ids ..
                             ' tags, expected ' .. n)
  end
  load_recs(g, ids)
  load_refs(ids)
  local done = {}
  local retried = ARGV[5] == '1'
  for i = 1, n do
    done[i] = ack_one(g, ids[i], tickets[i], retried)
  end
  return {'OK', done}
end

local function retry_ms(attempts, random)
  local retry = cfg.retry
  if not retry then
    return 0
  end
  local raw = retry.base * retry.factor ^ math.max(0, attempts - 1)
  local delay = math.min(retry.max, raw)
  if retry.jitter > 0 then
    local spread = 1 - retry.jitter + 2 * retry.jitter * random
    delay = math.min(retry.max, delay * spread)
  end
  return delay * 1000
end

-- ARGV: op, group, id, ticket, requeue (1/0), delay ms ("" for the
-- topic's retry), error ("" for none, else "=" .. text), random in [0, 1),
-- retried (as for ack).
local function nack()
  local g, id = ARGV[2], ARGV[3]
  if ARGV[9] == '1' then
    local rec = get_rec(g, id)
    if not rec or (rec.t == tonumber(ARGV[4]) + 1 and rec.s ~= 'F') then
      -- Dead-lettered, or put back once since this delivery (each put
      -- back raises the ticket) and not delivered again: most likely
      -- by the attempt whose reply was lost (see ack_one).
      return {'OK', 1}
    end
  end
  local rec = live(g, id, ARGV[4])
  if not rec then
    return {'OK', 0}
  end
  count('nacked')
  gcount(g, 'nacked')
  gcount(g, 'errors')
  leave_flight(g, id, rec)
  if ARGV[7] ~= '' then
    redis.call('HSET', gkey(g, 'err'), id, ARGV[7])
    rec.e = 1
  end
  on_failure(g, rec.l)
  if ARGV[5] ~= '1' then
    dead_letter(g, id, rec, 'rejected')
  elseif exhausted(g, rec.a) then
    dead_letter(g, id, rec, 'max_attempts')
  else
    count_redelivery(g)
    local wait
    if ARGV[6] ~= '' then
      wait = tonumber(ARGV[6])
    else
      wait = retry_ms(rec.a, tonumber(ARGV[8]))
    end
    park(g, id, rec)
    if wait > 0 then
      delay_until(g, id, rec, NOW + wait)
    else
      make_ready(g, id, rec, false)
    end
  end
  return {'OK', 1}
end

-- ARGV: op, group, id, ticket, seconds as ms.
local function extend()
  local g, id = ARGV[2], ARGV[3]
  local rec = live(g, id, ARGV[4])
  if not rec then
    return {'OK', 0}
  end
  rec.dl = NOW + tonumber(ARGV[5])
  rec.ta = 1
  put_rec(g, id, rec)
  redis.call('XCLAIM', stream(rec.l), g, rec.c, 0, id,
             'IDLE', idle_for(tonumber(ARGV[5])), 'JUSTID')
  redis.call('ZADD', TM, rec.dl, timer_member('A', g, id))
  changed = true
  return {'OK', 1}
end

-- ARGV: op, group, count, then id and ticket per delivery.
local function release()
  local g = ARGV[2]
  local n = tonumber(ARGV[3])
  local recs = {}
  for i = 1, n do
    local id = ARGV[2 + 2 * i]
    recs[i] = {id, live(g, id, ARGV[3 + 2 * i])}
  end
  local returned = 0
  for i = n, 1, -1 do
    local id, rec = recs[i][1], recs[i][2]
    if rec then
      rec.a = rec.a - 1
      leave_flight(g, id, rec)
      park(g, id, rec)
      make_ready(g, id, rec, true)
      returned = returned + 1
    end
  end
  return {'OK', returned}
end

-- Gives back to group `g`, unseen and with the attempt refunded, entries
-- that a fetch finished under auto_ack but whose reply no caller took (a
-- cancelled get_async). An entry that has a record in the group again is
-- skipped. One whose stream entry is gone is kept as a copy in P rd, as
-- a redriven entry is. Replies with the number given back, or -1 when
-- the group does not exist.
-- ARGV: op, group, count, then per entry: id, attempts, field count and
-- the fields (name, value, ...) that the fetch returned.
local function put_back()
  local g = ARGV[2]
  if redis.call('HEXISTS', GROUPS, g) == 0 then
    return {'OK', -1}
  end
  local items = {}
  local at = 4
  for i = 1, tonumber(ARGV[3]) do
    local n = tonumber(ARGV[at + 2])
    local fields = {}
    for j = 1, n do
      fields[j] = ARGV[at + 2 + j]
    end
    items[i] = {ARGV[at], tonumber(ARGV[at + 1]), fields}
    at = at + 3 + n
  end
  local returned = 0
  for i = #items, 1, -1 do
    local id, attempts, fields = items[i][1], items[i][2], items[i][3]
    if not get_rec(g, id) then
      local lane = lane_of(tonumber(field(fields, 'p')) or 0)
      local redriven = 0
      if #redis.call('XRANGE', stream(lane), id, id) == 0 then
        local copy = {}
        for j = 1, #fields, 2 do
          if ENTRY_FIELDS[fields[j]] then
            copy[#copy + 1] = fields[j]
            copy[#copy + 1] = fields[j + 1]
          end
        end
        redis.call('HSET', RD, id, cmsgpack.pack(copy))
        redriven = 1
      end
      set_refs(id, get_refs(id) + 1)
      -- Delivered before, so its delay passed; its ttl still counts.
      local rec = setmetatable(
        {s = '', t = 0, a = math.max(attempts - 1, 0), l = lane,
         k = field(fields, 'k') or '', r = 1, c = '', p = 0, d = 0,
         x = tonumber(field(fields, 'x')) or 0, rd = redriven}, REC)
      enter_record(g, id, rec, true)
      returned = returned + 1
    end
  end
  changed = true
  return {'OK', returned}
end

-- ARGV: op, group, consumer.
local function in_flight()
  local g, consumer = ARGV[2], ARGV[3]
  if redis.call('HEXISTS', gkey(g, 'cons'), consumer) == 0 then
    return {'OK', 0}
  end
  return {'OK', inflight(g, consumer)}
end

-- Dead letters.

-- ARGV: op, limit (0: all).
local function dlq_list()
  local limit = tonumber(ARGV[2])
  if limit > 0 then
    return {'OK', redis.call('XRANGE', DLQ, '-', '+', 'COUNT', limit)}
  end
  return {'OK', redis.call('XRANGE', DLQ, '-', '+')}
end

-- ARGV: op, then the message ids to redrive (none: every dead letter).
-- A dead letter without a body stays in the stream: its entry was
-- trimmed before it was dead-lettered, so no copy of the message is
-- left to deliver.
local function dlq_redrive()
  local wanted = nil
  if #ARGV > 1 then
    wanted = {}
    for i = 2, #ARGV do
      wanted[ARGV[i]] = true
    end
  end
  local moved = 0
  for _, entry in ipairs(redis.call('XRANGE', DLQ, '-', '+')) do
    local fields = entry[2]
    local id = field(fields, 'id')
    if (wanted == nil or wanted[id]) and field(fields, 'b') then
      redis.call('XDEL', DLQ, entry[1])
      local g = field(fields, 'g')
      local lane = tonumber(field(fields, 'l'))
      -- A group that finished the entry before reading it keeps a marker
      -- (X); one that has it anywhere else is skipped.
      local marker = get_rec(g, id)
      local finished_unread = marker and marker.s == 'X'
      if redis.call('HEXISTS', GROUPS, g) == 1
          and (finished_unread or not marker and not unread(g, id, lane))
          then
        local copy = {}
        for i = 1, #fields, 2 do
          if ENTRY_FIELDS[fields[i]] then
            copy[#copy + 1] = fields[i]
            copy[#copy + 1] = fields[i + 1]
          end
        end
        -- A copy only when the stream entry is gone (finished by every
        -- group), so that `stored` counts each message once.
        local redriven = 0
        if #redis.call('XRANGE', stream(lane), id, id) == 0 then
          redis.call('HSET', RD, id, cmsgpack.pack(copy))
          redriven = 1
        end
        set_refs(id, get_refs(id) + 1)
        local key = field(fields, 'k') or ''
        -- rv: redriven, so no delay and no ttl.
        local rec = {s = '', t = 0, a = 0, l = lane, k = key, r = 1, c = '',
                     p = 0, d = 0, x = 0, rd = redriven, rv = 1}
        if finished_unread then
          rec.r = 0
        end
        enter_record(g, id, rec)
        moved = moved + 1
      end
    end
  end
  count('redriven', moved)
  changed = true
  return {'OK', moved}
end

local function dlq_purge()
  local purged = redis.call('XLEN', DLQ)
  redis.call('DEL', DLQ)
  count('dlq_purged', purged)
  return {'OK', purged}
end

-- State.

-- Returns the ready, delayed and in-flight messages of group `g`, and
-- the time (ms) the oldest ready one joined its lane, or nil.
-- NOTE: walks every record and unread entry of the group, so it takes
-- time in proportion to the backlog. XINFO GROUPS "lag" would be O(1),
-- but it counts delayed and key-hidden unread entries as ready.
local function group_state(g)
  local ready, delayed, in_flight_count = 0, 0, 0
  local oldest = nil
  local function ready_since(at)
    if at and (not oldest or at < oldest) then
      oldest = at
    end
  end
  for _, raw_rec in ipairs(redis.call('HVALS', gkey(g, 'st'))) do
    local rec = unpack_rec(raw_rec)
    local state = rec.s
    if state == 'D' then
      delayed = delayed + 1
    elseif state == 'F' then
      in_flight_count = in_flight_count + 1
    elseif state ~= 'X' then
      ready = ready + 1
      if state == 'R' then
        ready_since(rec.ra)
      end
    end
  end
  for _, lane in ipairs(cfg.lanes) do
    local from = '(' .. cursor(g, lane)
    while true do
      local page = redis.call('XRANGE', stream(lane), from, '+',
                              'COUNT', 1000)
      for _, entry in ipairs(page) do
        if not get_rec(g, entry[1]) then
          local due = tonumber(field(entry[2], 'd')) or 0
          if due > NOW then
            delayed = delayed + 1
          else
            ready = ready + 1
            ready_since(math.max(due, tonumber(field(entry[2], 't')) or NOW))
          end
        end
      end
      if #page < 1000 then
        break
      end
      from = '(' .. page[#page][1]
    end
  end
  return ready, delayed, in_flight_count, oldest
end

local function stats()
  save_counts()
  save_recs()
  save_stream_ops()
  local result = {}
  local raw = redis.call('HGETALL', META)
  for i = 1, #raw, 2 do
    if string.sub(raw[i], 1, 2) == 'c.' then
      result[#result + 1] = string.sub(raw[i], 3)
      result[#result + 1] = raw[i + 1]
    end
  end
  local ready, delayed, in_flight_count = 0, 0, 0
  local groups = redis.call('HKEYS', GROUPS)
  for _, g in ipairs(groups) do
    local r, d, f = group_state(g)
    ready = ready + r
    delayed = delayed + d
    in_flight_count = in_flight_count + f
  end
  local gauges = {stored = stored_count(), ready = ready,
                  delayed = delayed, in_flight = in_flight_count,
                  dlq = redis.call('XLEN', DLQ), groups = #groups}
  for name, value in pairs(gauges) do
    result[#result + 1] = name
    result[#result + 1] = value
  end
  return {'OK', result}
end

-- Replies per group: name, consumers, ready, delayed, in flight, the
-- oldest ready one's wait in ms (-1: none), its counters and its
-- histograms as flat field lists.
local function group_stats()
  save_counts()
  save_recs()
  save_stream_ops()
  local found = {}
  for _, g in ipairs(redis.call('HKEYS', GROUPS)) do
    local ready, delayed, flying_count, oldest = group_state(g)
    local wait = -1
    if oldest then
      wait = string.format('%.3f', math.max(0, NOW - oldest))
    end
    found[#found + 1] = {g, redis.call('HLEN', gkey(g, 'cons')), ready,
                         delayed, flying_count, wait,
                         redis.call('HGETALL', gkey(g, 'ctr')),
                         redis.call('HGETALL', gkey(g, 'hist'))}
  end
  return {'OK', found}
end

-- Topics.

-- ARGV: op, config JSON. Stores it unless one is stored; returns the
-- stored one. A stored one is read first, so that declaring an existing
-- topic needs no write, which a server out of memory would reject.
local function declare()
  local stored = redis.call('HGET', META, 'cfg')
  if stored then
    return {'EXISTS', stored}
  end
  redis.call('HSETNX', META, 'cfg', ARGV[2])
  return {'NEW'}
end

local OPS = {publish = publish, open = open_consumer,
             close = close_consumer, fetch = fetch, ack = ack,
             ack_many = ack_many, nack = nack,
             extend = extend, release = release, put_back = put_back,
             in_flight = in_flight,
             dlq_list = dlq_list, dlq_redrive = dlq_redrive,
             dlq_purge = dlq_purge, stats = stats,
             group_stats = group_stats}

-- Operations that run also on a server out of memory (see below).
local MAY_EXCEED_MAXMEMORY = {
  fetch = true, ack = true, ack_many = true, nack = true, extend = true,
  release = true, put_back = true, close = true, in_flight = true,
  dlq_list = true, dlq_purge = true, stats = true, group_stats = true}

-- Decoded configurations by their JSON text. A library function keeps
-- it between calls, which saves about 10 us of cjson.decode per call
-- (Redis 7.0.15, 2-vCPU guest). The script only reads a configuration.
local cfg_cache, cfg_cached = {}, 0

local function decode_cfg(raw)
  local decoded = cfg_cache[raw]
  if not decoded then
    if cfg_cached >= 256 then
      cfg_cache, cfg_cached = {}, 0
    end
    decoded = cjson.decode(raw)
    cfg_cache[raw] = decoded
    cfg_cached = cfg_cached + 1
  end
  return decoded
end

-- Sets the per-call state: a library function keeps the upvalues of
-- this file between calls, while EVAL runs the whole file every call.
local function begin_call(keys, args)
  KEYS, ARGV = keys, args
  META = KEYS[1]
  P = string.sub(META, 1, #META - 4)
  OP = ARGV[1]
  GROUPS, REFS, RET, TM = P .. 'groups', P .. 'refs', P .. 'ret', P .. 'tm'
  DLQ, RD, WAKE = P .. 'dlq', P .. 'rd', P .. 'wake'
  cfg, NOW, changed, invalidate = nil, nil, false, false
  flying, scheds, counts, cursors, dirty_cursors = {}, {}, {}, {}, {}
  ids, peeks, rq_heads = nil, {}, {}
  rec_cache, rec_dirty, refs_cache, refs_dirty, refs_absent = {}, {}, {}, {}, {}
  inflight_delta, stream_acks, stream_dels, pending_reads = {}, {}, {}, {}
  group_counts, drop_totals, deadline_claims, last_claim = {}, {}, {}, nil
  retained, group_names, overdue = nil, nil, {}
  fetch_work, out_of_work, sample_every, delivered_before = 0, false, 0, {}
end

-- Returns whether a server above its maxmemory may run this call with
-- the allow-oom flag: an operation of MAY_EXCEED_MAXMEMORY, the open of
-- an existing group, or the declare of an existing topic. That declare
-- only reads the stored configuration, so EVAL runs it too.
local function may_exceed_maxmemory()
  if MAY_EXCEED_MAXMEMORY[OP] then
    return true
  end
  if OP == 'open' then
    return redis.call('HEXISTS', GROUPS, ARGV[2]) == 1
  end
  if OP == 'declare' then
    return redis.call('HEXISTS', META, 'cfg') == 1
  end
  return false
end

-- Runs one call. `allow_oom` is true for the library function that a
-- server above its maxmemory still runs (registered with the allow-oom
-- flag), which takes only the calls that may_exceed_maxmemory accepts.
-- Every reply ends with the drop counters that changed, as one flat
-- list: name, total before, total after, for each.
local function run_call(keys, args, allow_oom)
  begin_call(keys, args)
  if allow_oom and not may_exceed_maxmemory() then
    -- The error a server above its maxmemory gives a function without
    -- the allow-oom flag: the client retries with this function only
    -- after that error.
    return redis.error_reply(
      "OOM command not allowed when used memory > 'maxmemory'.")
  end
  if OP == 'declare' then
    local reply = declare()
    reply[#reply + 1] = {}
    return reply
  end
  if OP == 'replace' then
    redis.call('HSET', META, 'cfg', ARGV[2])
    redis.call('XADD', WAKE, 'MAXLEN', 1, '*', 'n', 1)
    return {'OK', {}}
  end
  local raw_cfg = redis.call('HGET', META, 'cfg')
  if not raw_cfg then
    return redis.error_reply('MQS_UNKNOWN topic')
  end
  cfg = decode_cfg(raw_cfg)
  NOW = now_ms()
  local operation = OPS[OP]
  if not operation then
    return redis.error_reply('MQS_BUG unknown operation ' .. tostring(OP))
  end
  -- A server whose used memory is above maxmemory (and that may evict
  -- nothing) rejects the first write command that can add data of a
  -- script without a "#!lua" flags line, with the OOM error that the
  -- Redis docs page "OOM error" describes. It rejects no write after
  -- the script wrote anything (checked on Redis 7.0.15, and by the
  -- backend's tests). These operations free memory or add little. As
  -- consumers need them to drain a topic, each starts with a write that
  -- adds nothing (HDEL of a field that never exists). Publishing, declaring
  -- and creating a group still get the OOM error. A library function
  -- gets that error before it starts unless it has the allow-oom flag.
  -- So the client calls these operations through the one that has it.
  if MAY_EXCEED_MAXMEMORY[OP]
      or OP == 'open' and redis.call('HEXISTS', GROUPS, ARGV[2]) == 1 then
    redis.call('HDEL', META, '')
  end
  -- A fetch renews the consumer's lease before the timers fire, so that
  -- a live consumer is never removed by its own call.
  if OP == 'fetch' and (ARGV[9] or '') ~= '' then
    renew_lease(ARGV[2], ARGV[3], tonumber(ARGV[9]))
  end
  fire()
  trim_retained()
  local reply = operation()
  save_scheds()
  save_counts()
  save_ids()
  save_cursors()
  save_recs()
  save_refs()
  save_inflight()
  save_stream_ops()
  local wake_id = '0-0'
  if changed then
    wake_id = redis.call('XADD', WAKE, 'MAXLEN', 1, '*', 'n', 1)
  else
    local last = redis.call('XREVRANGE', WAKE, '+', '-', 'COUNT', 1)
    if #last > 0 then
      wake_id = last[1][1]
    end
  end
  reply[#reply + 1] = wake_id
  local drops = {}
  for name, totals in pairs(drop_totals) do
    drops[#drops + 1] = name
    drops[#drops + 1] = totals[1]
    drops[#drops + 1] = totals[2]
  end
  reply[#reply + 1] = drops
  return reply
end

-- The client appends the lines that run a call: "return run_call(...)"
-- for EVAL, or the register_function calls of the library.
