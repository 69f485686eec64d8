-- The journal's write script (script.py names its arguments and reply). The names between two
-- at signs come from schema.py, filled in as Lua strings or numbers when the module loads.
local idx, status_key, counts_key = KEYS[1], KEYS[2], KEYS[3]
local prefix = ARGV[1]
local p = {}
for v in string.gmatch(ARGV[2], '%S+') do p[#p + 1] = tonumber(v) end
local budget_pct, budget_fixed, rotate_div, min_ret, max_ret, my_ttl = p[1], p[2], p[3], p[4], p[5], p[6]
local max_buckets, global_cap, run_cap, marker_window = p[7], p[8], p[9], p[10]
local mem_check, pressure_pct, resume_pct, sample_counters = p[11], p[12], p[13], p[14] == 1
local series_every = p[15] or 0
local overhead, bucket_overhead = @FIELD_OVERHEAD@, @BUCKET_OVERHEAD@
local US, RS = '\31', '\30'

local function fmt(n) return string.format('%d', n) end
local function split(s)
  local out = {}
  for f in string.gmatch(s .. US, '([^\31]*)\31') do out[#out + 1] = f end
  return out
end

local function pexpire(k, ms) redis.call('PEXPIRE', k, ms) end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- Memory pressure, and the longest state TTL any writer has seen: shared by the fleet.
local st = redis.call('HMGET', status_key, @S_AT@, @S_USED@, @S_MAX@, @S_POLICY@, @S_PAUSED@, @S_TTL@, @S_COUNTERS@,
                     @S_COUNTERS_PREVIOUS@, @S_SERIES_AT@)
-- Redis's counters (evictions, expiries, deleting commands), sampled with the memory check:
-- an init carries the newest sample taken before it, so the analysis can tell what happened since.
local samples = {st[7], st[8]}
local new_sample = nil  -- taken by this call: it may also go into the bucket's series
local used, maxmem, policy, paused = tonumber(st[2]) or 0, tonumber(st[3]) or 0, st[4] or '', st[5] == '1'
local ttl = math.max(tonumber(st[6]) or 0, my_ttl)
local retention = max_ret
if ttl > 0 then retention = math.min(max_ret, math.max(min_ret, 2 * ttl)) end
if now - (tonumber(st[1]) or 0) >= mem_check then
  local info
  if sample_counters then info = redis.call('INFO', 'memory', 'stats', 'commandstats')
  else info = redis.call('INFO', 'memory') end
  used = tonumber(string.match(info, 'used_memory:(%d+)')) or 0
  maxmem = tonumber(string.match(info, 'maxmemory:(%d+)')) or 0
  policy = string.match(info, 'maxmemory_policy:([%w%-]+)') or ''
  if maxmem > 0 and used * 100 >= maxmem * pressure_pct then
    paused = true
  elseif maxmem == 0 or used * 100 < maxmem * resume_pct then
    paused = false
  end
  redis.call('HSET', status_key, @S_AT@, fmt(now), @S_USED@, fmt(used), @S_MAX@, fmt(maxmem), @S_POLICY@, policy,
             @S_PAUSED@, paused and '1' or '0', @S_TTL@, fmt(ttl))
  if sample_counters then
    local deletes = 0
    for _, c in ipairs({@DELETING_COMMANDS@}) do
      deletes = deletes + (tonumber(string.match(info, 'cmdstat_' .. c .. ':calls=(%d+)')) or 0)
    end
    local calls, usec = 0, 0
    for c, u in string.gmatch(info, 'cmdstat_[^:]+:calls=(%d+),usec=(%d+)') do
      calls, usec = calls + tonumber(c), usec + tonumber(u)
    end
    -- (the layout of schema.COUNTER_SAMPLE: an init carries the first four, the series all of them)
    local sample = fmt(now) .. ' ' .. (string.match(info, 'evicted_keys:(%d+)') or '') .. ' '
      .. (string.match(info, 'expired_keys:(%d+)') or '') .. ' ' .. fmt(deletes)
    if st[7] then redis.call('HSET', status_key, @S_COUNTERS_PREVIOUS@, st[7]) end
    redis.call('HSET', status_key, @S_COUNTERS@, sample)
    samples = {sample, st[7]}
    new_sample = sample .. ' ' .. fmt(used) .. ' ' .. fmt(calls) .. ' ' .. fmt(usec)
  end
  pexpire(status_key, max_ret)
elseif my_ttl > (tonumber(st[6]) or 0) then
  redis.call('HSET', status_key, @S_TTL@, fmt(ttl))
end
local budget = budget_fixed
if maxmem > 0 then budget = math.floor(maxmem * budget_pct / 100) end
local rotate_age = math.max(1000, math.floor(retention / rotate_div))
local rotate_bytes = math.max(4096, math.floor(budget / rotate_div))
global_cap = math.min(global_cap, math.max(1024, math.floor(budget / 64)))
run_cap = math.min(run_cap, math.max(1024, math.floor(budget / 4)))

-- The buckets, oldest first. Buckets that expired or were evicted leave the index.
local members = redis.call('ZRANGE', idx, 0, -1)
local starts, sizes, total, lost = {}, {}, 0, 0
for _, m in ipairs(members) do
  local size = redis.call('HGET', prefix .. m, @F_BYTES@)
  if size then
    starts[#starts + 1] = tonumber(m)
    sizes[#sizes + 1] = tonumber(size)
    total = total + tonumber(size)
  else
    redis.call('ZREM', idx, m)
    lost = lost + 1
  end
end
if lost > 0 then redis.call('HINCRBY', status_key, @S_LOST@, lost) end
local trimmed = 0
local function drop_oldest()
  -- HDEL of every field, not DEL/UNLINK: the user's deletes are counted by their commands'
  -- calls (the counters samples), and ours must not look like theirs. The last HDEL deletes the key.
  local bucket = prefix .. fmt(starts[1])
  local fields = redis.call('HKEYS', bucket)
  for j = 1, #fields, 1000 do
    redis.call('HDEL', bucket, unpack(fields, j, math.min(j + 999, #fields)))
  end
  redis.call('ZREM', idx, fmt(starts[1]))
  total = total - sizes[1]
  table.remove(starts, 1)
  table.remove(sizes, 1)
  trimmed = trimmed + 1
end

-- Near maxmemory every byte we write would cost the user's data: write nothing, give memory back.
-- Except tombstones (they are what explains the evictions now): they go into the quarter of the
-- budget the journal keeps after giving the rest back, never beyond it.
local tombstones_only = false
if paused then
  while #starts > 0 and total > budget / 4 do drop_oldest() end
  local any_tombstone = false
  for j = 4, #ARGV, 4 do
    local code = string.match(ARGV[j + 3] or '', '^[^\31]*\31(%a)')
    if code == @OP_EXPIRED@ or code == @OP_EVICTED@ or code == @OP_DEL@ then any_tombstone = true end
  end
  if not any_tombstone or total >= budget / 4 then
    return {@REPLY_PAUSED@, total, #starts, trimmed, lost, used, maxmem, policy, budget}
  end
  tombstones_only = true
end

local n = #starts
if n == 0 or now - starts[n] >= rotate_age or sizes[n] >= rotate_bytes then
  local start = now
  if n > 0 and start <= starts[n] then start = starts[n] + 1 end
  local key = prefix .. fmt(start)
  redis.call('HSET', key, @F_BYTES@, bucket_overhead)
  pexpire(key, retention + rotate_age)
  redis.call('ZADD', idx, start, fmt(start))
  pexpire(idx, 2 * max_ret)
  n = n + 1
  starts[n], sizes[n] = start, bucket_overhead
  total = total + bucket_overhead
end
local cur = prefix .. fmt(starts[n])
local off = fmt(now - starts[n])
local grow = {}
for k = 1, n do grow[k] = 0 end

-- The counters series (diagnose --patterns): every series_every ms, the sample joins the bucket's.
if new_sample and series_every > 0 and now - (tonumber(st[9]) or 0) >= series_every then
  local series = redis.call('HGET', cur, @F_SERIES@)
  redis.call('HSET', cur, @F_SERIES@, (series or '') .. new_sample .. RS)
  redis.call('HSET', status_key, @S_SERIES_AT@, fmt(now))
  grow[n] = grow[n] + #new_sample + 1 + (series and 0 or overhead + 1)
end

for id, info in string.gmatch(ARGV[3], '([^\31\30]+)\31([^\30]*)\30') do
  if redis.call('HSETNX', cur, @F_WRITER@ .. id, info) == 1 then grow[n] = grow[n] + #id + 2 + #info + overhead end
end

local pending, order, gparts, counts, results, markers = {}, {}, {}, {}, {}, {}
local function run_value(k, field)
  local v = redis.call('HGET', prefix .. fmt(starts[k]), field) or ''
  if k == n and pending[field] then v = v .. table.concat(pending[field]) end
  return v
end

local rec, i = 0, 4
while i + 3 <= #ARGV do
  rec = rec + 1
  local run, ck, seen, body = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  i = i + 4
  local f = split(body)
  local op = f[2]
  repeat  -- (a loop run once: 'break' skips a record)
  if tombstones_only and op ~= @OP_EXPIRED@ and op ~= @OP_EVICTED@ and op ~= @OP_DEL@ then break end
  if op == @OP_INIT@ then
    -- the newest counters sample taken no later than the init itself (its flush less its lag)
    local op_ms = now - (tonumber(f[1]) or 0)
    for _, sample in ipairs(samples) do
      if sample and (tonumber(string.match(sample, '^(%d+)')) or now) <= op_ms then
        body = body .. US .. sample
        break
      end
    end
  end
  local weight = 1
  if op == @OP_SUPPRESSED@ then weight = tonumber(f[8]) or 1 end  -- a record counting rate-limited misses
  counts[op] = (counts[op] or 0) + weight
  if run ~= '' then
    local field = @F_RUN@ .. run
    local node = f[3]
    local mfield = @F_MARKER@ .. run .. US .. node .. US .. ck
    if op == @OP_INIT@ and ck ~= '' then
      -- An init answers a miss of the same key that left a marker: a race. Buckets
      -- without markers (the common case) cost one HGET of their count per batch.
      for k = n, 1, -1 do
        if k < n and starts[k + 1] < now - marker_window then break end
        local bk = prefix .. fmt(starts[k])
        if markers[k] == nil then markers[k] = tonumber(redis.call('HGET', bk, @F_MARKER_COUNT@) or '0') end
        local marker = markers[k] > 0 and redis.call('HGET', bk, mfield)
        if marker then
          redis.call('HDEL', bk, mfield)
          redis.call('HINCRBY', bk, @F_MARKER_COUNT@, -1)
          markers[k] = markers[k] - 1
          grow[k] = grow[k] - (#mfield + #marker + overhead)
          results[#results + 1] = rec
          results[#results + 1] = 'init'
          results[#results + 1] = marker
          break
        end
      end
    elseif op == @OP_MISS@ and seen ~= '' and ck ~= '' then
      -- A miss whose analysis did not see an init that was already written: a race.
      local seen_ms, found = tonumber(seen), nil
      for k = n, 1, -1 do
        if k < n and starts[k + 1] <= seen_ms then break end
        for r in string.gmatch(run_value(k, field), '([^\30]*)\30') do
          local g = split(r)
          local arrived = starts[k] + (tonumber(g[1]) or 0)
          if g[3] == @OP_INIT@ and g[4] == node and g[5] == ck and arrived > seen_ms then found = g[8] end
        end
        if found then break end
      end
      if found then
        results[#results + 1] = rec
        results[#results + 1] = 'miss'
        results[#results + 1] = found
      else
        local marker = f[7] .. US .. fmt(now) .. US .. (f[8] or '')
        local old = redis.call('HGET', cur, mfield)
        redis.call('HSET', cur, mfield, marker)
        if old then
          grow[n] = grow[n] + #marker - #old
        else
          markers[n] = redis.call('HINCRBY', cur, @F_MARKER_COUNT@, 1)
          grow[n] = grow[n] + #mfield + #marker + overhead
        end
      end
    end
    if not pending[field] then
      pending[field] = {}
      order[#order + 1] = field
    end
    local list = pending[field]
    list[#list + 1] = off .. US .. body .. RS
  end
  gparts[#gparts + 1] = off .. US .. run .. US .. body .. RS
  until true
end

local function append(field, tail, cap)
  local old = redis.call('HGET', cur, field)
  local new = (old or '') .. tail
  if #new > cap then
    local cut = string.find(new, RS, #new - cap, true)
    new = cut and string.sub(new, cut + 1) or ''
  end
  redis.call('HSET', cur, field, new)
  if old then grow[n] = grow[n] + #new - #old else grow[n] = grow[n] + #field + #new + overhead end
end
for _, field in ipairs(order) do append(field, table.concat(pending[field]), run_cap) end
if #gparts > 0 then append(@F_GLOBAL@, table.concat(gparts), global_cap) end
for op, c in pairs(counts) do redis.call('HINCRBY', counts_key, op, c) end

for k = 1, n do
  if grow[k] ~= 0 then
    redis.call('HINCRBY', prefix .. fmt(starts[k]), @F_BYTES@, grow[k])
    sizes[k] = sizes[k] + grow[k]
    total = total + grow[k]
  end
end

-- The budget, the bucket count and the retention: the oldest buckets go first.
while n > 1 and (total > budget or n > max_buckets or starts[1] < now - retention - rotate_age) do
  drop_oldest()
  n = n - 1
end
local out = {tombstones_only and 'paused+tombstones' or 'ok', total, n, trimmed, lost, used, maxmem, policy, budget}
for _, v in ipairs(results) do out[#out + 1] = v end
return out
