"""The Lua scripts: each a check and a change that must happen at once for every instance (Redis
runs a script without interleaving anything else). Key names as in parley.cluster.keys; the keys are
built inside the scripts, so this needs one Redis (or a primary with replicas), not Redis Cluster."""

from __future__ import annotations

# ARGV: me, ttl_ms, cap (0: none), call id, aliases... Returns {"ok", held callbacks...} or {reason}.
# A call id live anywhere is refused (duplicate_call_id); then the cluster cap (cluster_capacity).
# The callbacks held for the call's ids before any media socket came are handed over with it.
CLAIM = """
local me, ttl, cap, call = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
if redis.call('EXISTS', 'parley:owner:' .. call) == 1 then return {'duplicate_call_id'} end
if cap > 0 and redis.call('SCARD', 'parley:live') >= cap then return {'cluster_capacity'} end
local result = {'ok'}
for i = 4, #ARGV do
  local id = ARGV[i]
  redis.call('SET', 'parley:owner:' .. id, me, 'PX', ttl)
  redis.call('SADD', 'parley:instance:' .. me .. ':calls', id)
  redis.call('DEL', 'parley:recent:' .. id)
  for _, held in ipairs(redis.call('LRANGE', 'parley:early:' .. id, 0, -1)) do table.insert(result, held) end
  redis.call('DEL', 'parley:early:' .. id)
end
redis.call('SADD', 'parley:live', call)
return result
"""

# ARGV: me, recent_ms, call id, aliases... The call ended here: no longer ours, no longer counted;
# for `recent_ms` late callbacks still come here (the ended call's log).
RELEASE = """
local me, recent = ARGV[1], tonumber(ARGV[2])
for i = 3, #ARGV do
  local id = ARGV[i]
  local owner = redis.call('GET', 'parley:owner:' .. id)
  if owner == me then redis.call('DEL', 'parley:owner:' .. id) end
  if i == 3 and (owner == me or owner == false) then redis.call('SREM', 'parley:live', id) end
  redis.call('SREM', 'parley:instance:' .. me .. ':calls', id)
  redis.call('SET', 'parley:recent:' .. id, me, 'PX', recent)
end
return 1
"""

# ARGV: me, ttl_ms, then "m:<call id>" / "a:<alias>" for every call held here. The heartbeat: this
# instance is alive, and so is its hold on its calls (taken again after Redis was unreachable,
# unless another instance took the id meanwhile).
HEARTBEAT = """
local me, ttl = ARGV[1], tonumber(ARGV[2])
redis.call('SET', 'parley:instance:' .. me, '1', 'PX', ttl)
redis.call('SADD', 'parley:instances', me)
for i = 3, #ARGV do
  local kind, id = string.sub(ARGV[i], 1, 1), string.sub(ARGV[i], 3)
  local key = 'parley:owner:' .. id
  local owner = redis.call('GET', key)
  if owner == false or owner == me then
    redis.call('SET', key, me, 'PX', ttl)
    redis.call('SADD', 'parley:instance:' .. me .. ':calls', id)
    if kind == 'm' then redis.call('SADD', 'parley:live', id) end
  end
end
return 1
"""

# ARGV: dead instance. Its calls no longer held or counted (unless another instance holds an id
# now); returns the ids it held that nobody holds, for the survivor to hang up and forget.
CLEAN_UP = """
local dead = ARGV[1]
local set = 'parley:instance:' .. dead .. ':calls'
local orphans = {}
for _, id in ipairs(redis.call('SMEMBERS', set)) do
  local owner = redis.call('GET', 'parley:owner:' .. id)
  if owner == dead or owner == false then
    redis.call('DEL', 'parley:owner:' .. id)
    redis.call('SREM', 'parley:live', id)
    table.insert(orphans, id)
  end
end
redis.call('DEL', set)
redis.call('SREM', 'parley:instances', dead)
return orphans
"""

# ARGV: me, call key, message, most held, held_ms. A callback goes to the instance holding the
# call's media socket (or where it just ended): "local", "forwarded", or "held" for the socket to come.
DELIVER = """
local me, id, message = ARGV[1], ARGV[2], ARGV[3]
local owner = redis.call('GET', 'parley:owner:' .. id)
if not owner then owner = redis.call('GET', 'parley:recent:' .. id) end
if owner == me then return 'local' end
if owner and redis.call('PUBLISH', 'parley:commands:' .. owner, message) > 0 then return 'forwarded' end
local list = 'parley:early:' .. id
redis.call('RPUSH', list, message)
redis.call('LTRIM', list, -tonumber(ARGV[4]), -1)
redis.call('PEXPIRE', list, ARGV[5])
return 'held'
"""
