"""The job transitions as Lua scripts: each one atomic in Redis, so the API and any number of
workers can race safely (:class:`ham_core.job_store.JobStore` runs them).

KEYS and ARGV are documented at the top of each script. All of them refuse to touch a job hash
that does not exist (expired) and answer ``{"missing"}``. Each change bumps the job's ``version``
and PUBLISHes it on the job's events channel (the last ARGV), in the same script, so a
subscriber never misses a change it could have read.

Fencing: a worker's writes name its run (``ARGV run``; ``''`` for the API's and tools' writes)
and are refused (``{'fenced', status}``, or ``-1`` for progress) once that run no longer owns
the job. Redis refuses a script for lack of memory only at its first write, so a refused
script changed nothing.
"""

ANNOUNCE = """
local function announce(job, channel)
  local version = redis.call('HINCRBY', job, 'version', 1)
  redis.call('PUBLISH', channel, version)
end
"""

# KEYS: job, queued, queued_tenant, running, rq_queue   ARGV: job_id, worker, now, ttl
START = ANNOUNCE + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {'missing'} end
-- Already running on this worker: a retry of this very call whose first reply was lost.
if st == 'running' and redis.call('HGET', KEYS[1], 'worker') == ARGV[2] then
  return {'ok', redis.call('HGETALL', KEYS[1])}
end
if st ~= 'queued' then return {'skip', st} end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[2], 'started_at', ARGV[3], 'progress', '0.0')
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HINCRBY', KEYS[1], 'run', 1)
redis.call('HDEL', KEYS[1], 'finished_at', 'cancel')
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
redis.call('LREM', KEYS[5], 0, ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
announce(KEYS[1], ARGV[5])
return {'ok', redis.call('HGETALL', KEYS[1])}
"""

# A fenced write: the run named by the caller (ARGV run; '' = no fence) no longer owns the job.
FENCE = """
local function fenced(job, run)
  if run == '' then return false end
  return redis.call('HGET', job, 'status') ~= 'running' or redis.call('HGET', job, 'run') ~= run
end
"""

# Progress of the running job, only ever forward within one run (a new run starts at 0).
# KEYS: job   ARGV: progress, channel, run   →  1 recorded (or no change), 0 not running, -1 fenced
PROGRESS = ANNOUNCE + FENCE + """
if not redis.call('HGET', KEYS[1], 'status') then return 0 end
if fenced(KEYS[1], ARGV[3]) then return -1 end
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
if tonumber(redis.call('HGET', KEYS[1], 'progress') or '0') >= tonumber(ARGV[1]) then return 1 end
redis.call('HSET', KEYS[1], 'progress', ARGV[1])
announce(KEYS[1], ARGV[2])
return 1
"""

# Any non-terminal state → a terminal one, setting the given fields; with a run, only while
# that run owns the job.
# KEYS: job, queued, queued_tenant, running, rq_queue, finished
# ARGV: job_id, new_status, now, ttl, channel, run, field1, value1, ...
FINISH = ANNOUNCE + FENCE + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {'missing'} end
if st == 'succeeded' or st == 'failed' or st == 'canceled' then return {'conflict', st} end
if fenced(KEYS[1], ARGV[6]) then return {'fenced', st} end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'finished_at', ARGV[3])
for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HDEL', KEYS[1], 'cancel')
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('LREM', KEYS[5], 0, ARGV[1])
redis.call('HINCRBY', KEYS[6], ARGV[2], 1)
redis.call('EXPIRE', KEYS[1], ARGV[4])
announce(KEYS[1], ARGV[5])
return {'ok', redis.call('HGETALL', KEYS[1])}
"""

# Queued → canceled at once (the id leaves RQ's list so it never runs);
# running → the cancel flag, honoured by the worker between steps.
# KEYS: job, queued, queued_tenant, running, rq_queue, finished   ARGV: job_id, now, ttl, channel
CANCEL = ANNOUNCE + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {'missing'} end
if st == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'canceled', 'finished_at', ARGV[2])
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('LREM', KEYS[5], 0, ARGV[1])
  redis.call('HINCRBY', KEYS[6], 'canceled', 1)
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  announce(KEYS[1], ARGV[4])
elseif st == 'running' then
  redis.call('HSET', KEYS[1], 'cancel', '1')
else
  return {'conflict', st}
end
return {'ok', redis.call('HGETALL', KEYS[1])}
"""
