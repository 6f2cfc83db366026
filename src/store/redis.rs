//! The shared store (`MAILROOM_STORE=redis://…`): several mailroom
//! processes use one Redis for the queue, the retry and schedule set,
//! statuses and events, the list's indexes, idempotency keys, the
//! suppression list and the rate limit. Any replica answers any request the
//! same way, and any replica delivers any message.
//!
//! Keys (all under `mailroom:`):
//! - `msg:{id}`: the built message (JSON), while it may still be sent or
//!   retried by hand; `st:{id}`: a hash of its status (`json`), the status'
//!   revision (`rev`) and state name (`state`).
//! - `all`, `state:{state}`, `tag:{tag}`, `rcpt:{recipient}`: sorted sets
//!   of ids (score 0, so ordered by id, which starts with its time): the
//!   list's indexes. `ix:{id}`: which tag, recipient and key entries an id
//!   has, for forgetting it. `finished`: finished ids in finishing order,
//!   trimmed to `MAILROOM_STATUS_RETENTION`.
//! - `key:{idempotency key}`: `"{id} {fingerprint}"`.
//! - `queue`: a stream of ids due now, read by the consumer group
//!   `workers` (one consumer per replica); an entry stays pending (claimed)
//!   until its message finishes or waits for a retry. A live replica renews
//!   its claims; entries a silent replica held are taken over with
//!   `XAUTOCLAIM` after `MAILROOM_CLAIM_TIMEOUT_MS`.
//! - `due`: a sorted set of `r:{id}` (retries) and `s:{id}` (scheduled
//!   sends) by due time in milliseconds, moved into `queue` atomically.
//! - `held`, `scheduled`: the counts the capacities bound.
//! - `supp` (hash) and `supp:ix` (sorted set): the suppression list.
//! - `rate`: the theoretical arrival time of the group-wide rate limit (GCRA).
//!
//! Every change is one script (atomic), so nothing is lost or doubled
//! between the sets and the stream. A status change is a compare-and-set
//! on its revision: the worker's view and a cancel cannot both win. Scripts
//! touch keys they compute, so a standalone Redis (or Valkey) is needed,
//! not a Redis Cluster.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender};
use redis::{Connection, RedisError, Script, Value};

use super::index::id_key;
use super::{
    ActionRefusal, Admission, Counts, ListQuery, MessageRecord, Observer, Observers, Page,
    Settling, StatusRecord, Store, Suppression,
};
use crate::config::{Config, RedisSettings};
use crate::job::Job;
use crate::message::comparable_address;
use crate::message::OutgoingMessage;
use crate::metrics::{counter, Buckets, Histogram};
use crate::status::State;
use crate::time::to_millis;

const PREFIX: &str = "mailroom:";
const GROUP: &str = "workers";
/// How long a read of the queue blocks in Redis.
const BLOCK: Duration = Duration::from_millis(1000);
/// How often the due set is moved into the queue.
const MOVE_EVERY: Duration = Duration::from_millis(100);
/// Longest wait between attempts to reach an unreachable Redis.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Timeouts on every connection: Redis answers in microseconds, and an
/// unreachable one must not hold a request.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);
const IO_TIMEOUT: Duration = Duration::from_millis(2000);

const ACCEPT: &str = r#"
local p = ARGV[1]
local cap = tonumber(ARGV[2])
local scap = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local i = 5
local out = {}
for m = 1, n do
  local id, msg, st, state = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3]
  local due, key, fp, nix = ARGV[i+4], ARGV[i+5], ARGV[i+6], tonumber(ARGV[i+7])
  local ix = {}
  for k = 1, nix do ix[k] = ARGV[i+7+k] end
  i = i + 8 + nix
  local result = nil
  if key ~= '' then
    local known = redis.call('GET', p..'key:'..key)
    if known then
      local space = string.find(known, ' ', 1, true)
      if string.sub(known, space + 1) == fp then
        result = 'R'..string.sub(known, 1, space - 1)
      else
        result = 'C'
      end
    end
  end
  if not result then
    if state == 'scheduled' then
      if tonumber(redis.call('GET', p..'scheduled') or '0') >= scap then result = 'S' end
    elseif tonumber(redis.call('GET', p..'held') or '0') >= cap then
      result = 'F'
    end
  end
  if not result then
    redis.call('SET', p..'msg:'..id, msg)
    redis.call('HSET', p..'st:'..id, 'json', st, 'rev', '0', 'state', state)
    redis.call('ZADD', p..'all', 0, id)
    redis.call('ZADD', p..'state:'..state, 0, id)
    for k = 1, #ix do
      redis.call('ZADD', p..ix[k], 0, id)
      redis.call('SADD', p..'ix:'..id, ix[k])
    end
    if key ~= '' then
      redis.call('SET', p..'key:'..key, id..' '..fp)
      redis.call('SADD', p..'ix:'..id, 'key:'..key)
    end
    if state == 'scheduled' then
      redis.call('ZADD', p..'due', tonumber(due), 's:'..id)
      redis.call('INCR', p..'scheduled')
    elseif state == 'queued' then
      redis.call('XADD', p..'queue', '*', 'id', id)
      redis.call('INCR', p..'held')
    else
      -- sent and waited for (/api/mail/v2): delivered by this replica
      redis.call('INCR', p..'held')
    end
    result = 'A'
  end
  out[m] = result
end
return out
"#;

/// A status change, compare-and-set on the revision. ARGV: prefix, id,
/// expected revision, new JSON, new state, operation, ticket, retention,
/// due time or capacity. Returns 1 when done, 0 when the revision moved
/// on, -1 for an unknown id, -2 when the queue is full (requeue).
const UPDATE: &str = r#"
local p, id = ARGV[1], ARGV[2]
local st = p..'st:'..id
local rev = redis.call('HGET', st, 'rev')
if not rev then return -1 end
if rev ~= ARGV[3] then return 0 end
local op, ticket, retention, extra = ARGV[6], ARGV[7], tonumber(ARGV[8]), ARGV[9]
if op == 'requeue' and tonumber(redis.call('GET', p..'held') or '0') >= tonumber(extra) then
  return -2
end
local old = redis.call('HGET', st, 'state')
local new = ARGV[5]
redis.call('HSET', st, 'json', ARGV[4], 'rev', tostring(tonumber(rev) + 1), 'state', new)
if old ~= new then
  redis.call('ZREM', p..'state:'..old, id)
  redis.call('ZADD', p..'state:'..new, 0, id)
end
if ticket ~= '' then
  redis.call('XACK', p..'queue', 'workers', ticket)
  redis.call('XDEL', p..'queue', ticket)
end
local finished = false
if op == 'retry' then
  redis.call('ZADD', p..'due', tonumber(extra), 'r:'..id)
elseif op == 'finish' then
  redis.call('DECR', p..'held')
  redis.call('DEL', p..'msg:'..id)
  finished = true
elseif op == 'fail' then
  redis.call('DECR', p..'held')
  finished = true
elseif op == 'cancel' then
  if redis.call('ZREM', p..'due', 's:'..id) == 1 then
    redis.call('DECR', p..'scheduled')
  else
    redis.call('ZREM', p..'due', 'r:'..id)
    redis.call('DECR', p..'held')
  end
  redis.call('DEL', p..'msg:'..id)
  finished = true
elseif op == 'requeue' then
  redis.call('ZREM', p..'finished', id)
  redis.call('XADD', p..'queue', '*', 'id', id)
  redis.call('INCR', p..'held')
end
if finished then
  local seq = redis.call('INCR', p..'finseq')
  redis.call('ZADD', p..'finished', seq, id)
  while redis.call('ZCARD', p..'finished') > retention do
    local oldest = redis.call('ZPOPMIN', p..'finished')
    local gone = oldest[1]
    for _, entry in ipairs(redis.call('SMEMBERS', p..'ix:'..gone)) do
      if string.sub(entry, 1, 4) == 'key:' then
        local value = redis.call('GET', p..entry)
        if value and string.sub(value, 1, #gone + 1) == gone..' ' then redis.call('DEL', p..entry) end
      else
        redis.call('ZREM', p..entry, gone)
      end
    end
    local state = redis.call('HGET', p..'st:'..gone, 'state')
    if state then redis.call('ZREM', p..'state:'..state, gone) end
    redis.call('ZREM', p..'all', gone)
    redis.call('DEL', p..'st:'..gone, p..'msg:'..gone, p..'ix:'..gone)
  end
end
return 1
"#;

const MOVE_DUE: &str = r#"
local p = ARGV[1]
local due = redis.call('ZRANGEBYSCORE', p..'due', '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
for _, member in ipairs(due) do
  redis.call('ZREM', p..'due', member)
  if string.sub(member, 1, 1) == 's' then
    redis.call('DECR', p..'scheduled')
    redis.call('INCR', p..'held')
  end
  redis.call('XADD', p..'queue', '*', 'id', string.sub(member, 3))
end
return #due
"#;

/// Generic cell rate algorithm: deliveries `interval` apart over the whole
/// group, no initial burst. Returns how long the caller waits (ms).
const RATE: &str = r#"
local p = ARGV[1]
local interval, now = tonumber(ARGV[2]), tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', p..'rate') or '0')
local start = math.max(tat, now)
redis.call('SET', p..'rate', tostring(start + interval), 'PX', math.max(1000, 10 * interval))
return start - now
"#;

fn key(name: &str) -> String {
    format!("{PREFIX}{name}")
}

fn io_error(error: RedisError) -> io::Error {
    let kind = if error.is_io_error() || error.is_connection_dropped() || error.is_timeout() {
        io::ErrorKind::NotConnected
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, format!("Redis: {error}"))
}

fn now_ms() -> u64 {
    to_millis(SystemTime::now())
}

/// Whether Redis is reachable, as the last operations found.
#[derive(Default)]
struct Reach {
    /// While unreachable: when to try again, the backoff, and why.
    down: Option<(Instant, Duration, String)>,
}

/// A message this replica holds.
struct Held {
    /// Its stream entry (empty for `/api/mail/v2`).
    ticket: String,
    /// The status revision last read or written here, and that status.
    rev: Option<String>,
    status: Option<StatusRecord>,
    /// Its recipients on the suppression list, read with it.
    suppressed: Option<Vec<String>>,
    /// How many events it had when read (the observers get the new ones).
    events: u64,
}

/// The limits the scripts apply.
struct Limits {
    capacity: usize,
    scheduled_capacity: usize,
    retention: usize,
    wait_replicas: u32,
    claim_timeout: Duration,
    /// `1/MAILROOM_RATE_LIMIT` in milliseconds, when set.
    rate_interval_ms: Option<f64>,
}

/// The store latency histogram's buckets.
struct OperationSeconds;

impl Buckets for OperationSeconds {
    const UPPER: &'static [f64] = &[0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0];
}

/// How long the operations on Redis take (one round trip each, mostly).
#[derive(Default)]
struct Latency {
    operations: Histogram<OperationSeconds>,
    errors: std::sync::atomic::AtomicU64,
}

impl Latency {
    fn observe(&self, elapsed: Duration, ok: bool) {
        self.operations.observe(elapsed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn render(&self, up: bool) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        self.operations.render(
            &mut out,
            "mailroom_store_operation_seconds",
            "Time one operation on the shared store (Redis) took.",
        );
        counter(
            &mut out,
            "mailroom_store_errors_total",
            "Operations on the shared store that failed.",
            self.errors.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP mailroom_store_up Whether the shared store is reachable.\n# TYPE mailroom_store_up gauge\nmailroom_store_up {}",
            u8::from(up)
        );
        out
    }
}

struct Shared {
    latency: Latency,
    client: redis::Client,
    endpoint: String,
    idle: Mutex<Vec<Connection>>,
    reach: Mutex<Reach>,
    stopping: AtomicBool,
    consumer: String,
    limits: Limits,
    /// Messages this replica holds, by id: their stream entries (renewed),
    /// and what the feeder read of them, so a worker's changes need no
    /// read first.
    held: Mutex<HashMap<String, Held>>,
    observers: Observers,
    work: Sender<Job>,
    accept: Script,
    update: Script,
    move_due: Script,
    rate: Script,
}

/// The Redis store.
pub(crate) struct RedisStore {
    shared: Arc<Shared>,
    work: Receiver<Job>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    fn connect(&self) -> redis::RedisResult<Connection> {
        let connection = self.client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
        connection.set_read_timeout(Some(IO_TIMEOUT))?;
        connection.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(connection)
    }

    /// Runs `work` on a pooled connection. While Redis is known to be
    /// unreachable this fails at once (until the next try is due), so no
    /// request waits on it.
    fn with<T>(
        &self,
        work: impl FnOnce(&mut Connection) -> redis::RedisResult<T>,
    ) -> io::Result<T> {
        {
            let mut reach = lock(&self.reach);
            if let Some((retry_at, backoff, why)) = &mut reach.down {
                if Instant::now() < *retry_at {
                    return Err(io::Error::new(
                        io::ErrorKind::NotConnected,
                        format!("Redis at {} is unreachable: {why}", self.endpoint),
                    ));
                }
                // This caller tries; the others keep failing fast meanwhile.
                *backoff = (*backoff * 2).min(MAX_BACKOFF);
                *retry_at = Instant::now() + *backoff;
            }
        }
        let pooled = lock(&self.idle).pop();
        let mut connection = match pooled {
            Some(connection) => connection,
            None => match self.connect() {
                Ok(connection) => connection,
                Err(error) => return Err(self.unreachable(error)),
            },
        };
        let started = Instant::now();
        let result = work(&mut connection);
        self.latency.observe(started.elapsed(), result.is_ok());
        match result {
            Ok(value) => {
                lock(&self.idle).push(connection);
                self.reachable();
                Ok(value)
            }
            Err(error)
                if error.is_io_error() || error.is_connection_dropped() || error.is_timeout() =>
            {
                Err(self.unreachable(error))
            }
            Err(error) => {
                lock(&self.idle).push(connection);
                Err(io_error(error))
            }
        }
    }

    fn unreachable(&self, error: RedisError) -> io::Error {
        let mut reach = lock(&self.reach);
        if reach.down.is_none() {
            log::error!("Redis at {} is unreachable: {error}", self.endpoint);
            reach.down = Some((
                Instant::now() + Duration::from_millis(100),
                Duration::from_millis(100),
                error.to_string(),
            ));
        }
        lock(&self.idle).clear();
        io_error(error)
    }

    fn reachable(&self) {
        let mut reach = lock(&self.reach);
        if reach.down.take().is_some() {
            log::info!("Redis at {} is reachable again", self.endpoint);
        }
    }

    fn problem(&self) -> Option<String> {
        lock(&self.reach)
            .down
            .as_ref()
            .map(|(_, _, why)| format!("Redis at {} is unreachable: {why}", self.endpoint))
    }

    fn get_status(&self, id: &str) -> io::Result<Option<(StatusRecord, String)>> {
        if id_key(id).is_none() {
            return Ok(None);
        }
        let (json, rev): (Option<String>, Option<String>) = self.with(|connection| {
            redis::cmd("HMGET")
                .arg(key(&format!("st:{id}")))
                .arg("json")
                .arg("rev")
                .query(connection)
        })?;
        match (json, rev) {
            (Some(json), Some(rev)) => {
                let status: StatusRecord = serde_json::from_str(&json).map_err(|error| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("status of {id}: {error}"),
                    )
                })?;
                Ok(Some((status, rev)))
            }
            _ => Ok(None),
        }
    }

    fn get_statuses(&self, ids: &[String]) -> io::Result<Vec<StatusRecord>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let jsons: Vec<Option<String>> = self.with(|connection| {
            let mut pipe = redis::pipe();
            for id in ids {
                pipe.cmd("HGET").arg(key(&format!("st:{id}"))).arg("json");
            }
            pipe.query(connection)
        })?;
        Ok(jsons
            .into_iter()
            .flatten()
            .filter_map(|json| serde_json::from_str(&json).ok())
            .collect())
    }

    /// Runs the update script; `Ok(1)` done, `Ok(0)` changed meanwhile,
    /// `Ok(-1)` unknown, `Ok(-2)` full.
    #[allow(clippy::too_many_arguments)]
    fn update(
        &self,
        status: &StatusRecord,
        expected_rev: &str,
        op: &str,
        ticket: &str,
        extra: u64,
    ) -> io::Result<i64> {
        let json = serde_json::to_string(status).map_err(io::Error::other)?;
        self.with(|connection| {
            self.update
                .arg(PREFIX)
                .arg(&status.id)
                .arg(expected_rev)
                .arg(&json)
                .arg(status.state().as_str())
                .arg(op)
                .arg(ticket)
                .arg(self.limits.retention)
                .arg(extra)
                .invoke(connection)
        })
    }

    /// Changes a status with `change` when `allowed` accepts its state,
    /// retrying when another replica changed it in between.
    fn transition<R>(
        &self,
        id: &str,
        allowed: impl Fn(State) -> bool,
        mut change: impl FnMut(&mut StatusRecord) -> R,
        op: &str,
        ticket: &str,
        extra: u64,
    ) -> Result<(State, StatusRecord, R), ActionRefusal> {
        for _ in 0..16 {
            let Some((mut status, rev)) = self.get_status(id).map_err(ActionRefusal::Io)? else {
                return Err(ActionRefusal::Unknown);
            };
            let before = status.state();
            if !allowed(before) {
                return Err(ActionRefusal::State(before));
            }
            let before_events = status.events_total;
            let result = change(&mut status);
            status.updated_at_ms = now_ms();
            status.revision += 1;
            match self
                .update(&status, &rev, op, ticket, extra)
                .map_err(ActionRefusal::Io)?
            {
                1 => {
                    self.notify(&status, before_events);
                    return Ok((before, status, result));
                }
                -1 => return Err(ActionRefusal::Unknown),
                -2 => return Err(ActionRefusal::Full),
                _ => continue,
            }
        }
        Err(ActionRefusal::Io(io::Error::other(format!(
            "message {id} keeps changing; try again"
        ))))
    }

    /// Writes a status the caller owns (a worker's message), whatever its
    /// revision now; `op` says what else changes. While Redis is
    /// unreachable the worker waits here (it could not take another message
    /// anyway) and keeps its claim, so the outcome is recorded once Redis is
    /// back instead of the message being sent again; a stop gives up (then
    /// another replica takes the message over).
    fn record(&self, status: &StatusRecord, op: &str, extra: u64) {
        let id = status.id.clone();
        let (ticket, mut known_rev, known_events) = lock(&self.held)
            .get(&id)
            .map(|held| (held.ticket.clone(), held.rev.clone(), held.events))
            .unwrap_or_default();
        let mut backoff = Duration::from_millis(100);
        let mut warned = false;
        loop {
            // With the revision the worker began from, one round trip; else
            // (or when it moved on) read it first.
            let outcome = match known_rev.take() {
                Some(rev) => self
                    .update(status, &rev, op, &ticket, extra)
                    .map(|answer| Some((answer, known_events))),
                None => self.get_status(&id).and_then(|known| match known {
                    None => Ok(None),
                    Some((known, rev)) => self
                        .update(status, &rev, op, &ticket, extra)
                        .map(|answer| Some((answer, known.events_total))),
                }),
            };
            match outcome {
                Ok(Some((1, before_events))) => {
                    self.notify(status, before_events);
                    break;
                }
                // The revision moved on (a cancel): read it again.
                Ok(Some((0, _))) => continue,
                Ok(Some(_)) | Ok(None) => {
                    log::warn!(
                        "message {id}: no longer known to the store; its {op} is not recorded"
                    );
                    break;
                }
                Err(error) => {
                    if self.stopping.load(Ordering::SeqCst) {
                        log::error!("message {id}: stopping before its {op} could be recorded ({error}); another replica will take it over");
                        break;
                    }
                    if !warned {
                        log::warn!(
                            "message {id}: its {op} waits until the store is reachable: {error}"
                        );
                        warned = true;
                    }
                    // Pacing retries against an unreachable Redis.
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        lock(&self.held).remove(&id);
    }

    fn notify(&self, status: &StatusRecord, before_events: u64) {
        self.observers.tell(status, before_events);
    }

    /// Turns stream entries into jobs for the workers: one round trip
    /// reads every entry's message, status and suppressed recipients.
    fn feed(&self, entries: Vec<(String, String)>) {
        if entries.is_empty() {
            return;
        }
        type Loaded = (Option<String>, Option<String>, Option<String>);
        let loaded: io::Result<Vec<Loaded>> = self.with(|connection| {
            let mut pipe = redis::pipe();
            for (_, id) in &entries {
                pipe.cmd("GET")
                    .arg(key(&format!("msg:{id}")))
                    .cmd("HMGET")
                    .arg(key(&format!("st:{id}")))
                    .arg("json")
                    .arg("rev");
            }
            let values: Vec<Value> = pipe.query(connection)?;
            Ok(values
                .chunks(2)
                .map(|pair| {
                    let message = redis::from_redis_value::<Option<String>>(pair[0].clone())
                        .ok()
                        .flatten();
                    let (json, rev) = redis::from_redis_value::<(Option<String>, Option<String>)>(
                        pair.get(1).cloned().unwrap_or(Value::Nil),
                    )
                    .unwrap_or((None, None));
                    (message, json, rev)
                })
                .collect())
        });
        let loaded = match loaded {
            Ok(loaded) => loaded,
            Err(error) => {
                log::warn!("queue: messages cannot be read ({error}); they are taken again later");
                return;
            }
        };
        let mut jobs = Vec::new();
        for ((ticket, id), (message, status, rev)) in entries.into_iter().zip(loaded) {
            let (Some(message), Some(status)) = (message, status) else {
                // Finished or cancelled meanwhile: nothing to send.
                self.forget_entry(&ticket);
                continue;
            };
            let parsed: Result<(OutgoingMessage, StatusRecord), serde_json::Error> =
                serde_json::from_str(&message)
                    .and_then(|message| Ok((message, serde_json::from_str(&status)?)));
            let Ok((message, status)) = parsed else {
                log::error!("queue: message {id} is unreadable in the store; skipped");
                self.forget_entry(&ticket);
                continue;
            };
            if !matches!(
                status.state(),
                State::Queued | State::Retrying | State::Scheduled | State::Sending
            ) {
                self.forget_entry(&ticket);
                continue;
            }
            jobs.push((ticket, id, message, status, rev));
        }
        let recipients: Vec<String> = jobs
            .iter()
            .flat_map(|(_, _, _, status, _)| status.pending_recipients().iter().cloned())
            .collect();
        let suppressed: Option<HashSet<String>> = self
            .suppressed_among(&recipients)
            .ok()
            .map(|list| list.into_iter().collect());
        for (ticket, id, message, status, rev) in jobs {
            let pending = status.pending_shared();
            lock(&self.held).insert(
                id.clone(),
                Held {
                    ticket: ticket.clone(),
                    rev,
                    events: status.events_total,
                    status: Some(status.clone()),
                    suppressed: suppressed.as_ref().map(|suppressed| {
                        pending
                            .iter()
                            .filter(|recipient| suppressed.contains(*recipient))
                            .cloned()
                            .collect()
                    }),
                },
            );
            let mut job = Job::new(Arc::new(message), pending, status.attempts);
            job.ticket = Some(ticket);
            // Blocks while the workers are busy: that is the back-pressure
            // (this replica claims no more than it can deliver soon).
            if self.work.send(job).is_err() {
                return;
            }
        }
    }

    /// Puts an address on the suppression list with `set` (`HSET` to
    /// replace an entry, `HSETNX` to keep one); true when it was new.
    fn put_suppression(
        &self,
        address: &str,
        reason: Option<String>,
        set: &str,
    ) -> io::Result<(Suppression, bool)> {
        let entry = Suppression {
            address: address.trim().to_string(),
            reason,
            created_at_ms: now_ms(),
        };
        let json = serde_json::to_string(&entry).map_err(io::Error::other)?;
        let normalized = comparable_address(address);
        let (added, _): (bool, i64) = self.with(|connection| {
            redis::pipe()
                .atomic()
                .cmd(set)
                .arg(key("supp"))
                .arg(&normalized)
                .arg(&json)
                .cmd("ZADD")
                .arg(key("supp:ix"))
                .arg(0)
                .arg(&normalized)
                .query(connection)
        })?;
        Ok((entry, added))
    }

    /// Which of `recipients` are on the suppression list (one round trip).
    fn suppressed_among(&self, recipients: &[String]) -> io::Result<Vec<String>> {
        if recipients.is_empty() {
            return Ok(Vec::new());
        }
        let known: Vec<bool> = self.with(|connection| {
            let mut pipe = redis::pipe();
            for recipient in recipients {
                pipe.cmd("HEXISTS")
                    .arg(key("supp"))
                    .arg(comparable_address(recipient));
            }
            pipe.query(connection)
        })?;
        Ok(recipients
            .iter()
            .zip(known)
            .filter(|(_, known)| *known)
            .map(|(recipient, _)| recipient.clone())
            .collect())
    }

    fn forget_entry(&self, ticket: &str) {
        let _ = self.with(|connection| {
            redis::pipe()
                .cmd("XACK")
                .arg(key("queue"))
                .arg(GROUP)
                .arg(ticket)
                .cmd("XDEL")
                .arg(key("queue"))
                .arg(ticket)
                .query::<()>(connection)
        });
    }

    /// Keeps this replica's claims alive (resets their idle time), and says
    /// it is alive (its pending webhooks stay its own).
    fn renew(&self) {
        let alive = self.with(|connection| {
            redis::cmd("SET")
                .arg(key(&format!("alive:{}", self.consumer)))
                .arg(1)
                .arg("PX")
                .arg(self.limits.claim_timeout.as_millis() as u64)
                .query::<()>(connection)
        });
        if let Err(error) = alive {
            log::warn!("store: this replica's heartbeat is not renewed: {error}");
        }
        let tickets: Vec<String> = lock(&self.held)
            .values()
            .filter(|held| !held.ticket.is_empty())
            .map(|held| held.ticket.clone())
            .collect();
        if tickets.is_empty() {
            return;
        }
        let renewed = self.with(|connection| {
            let mut command = redis::cmd("XCLAIM");
            command
                .arg(key("queue"))
                .arg(GROUP)
                .arg(&self.consumer)
                .arg(0)
                .arg(&tickets)
                .arg("JUSTID");
            command.query::<Value>(connection)
        });
        if let Err(error) = renewed {
            log::warn!("queue: claims not renewed: {error}");
        }
    }

    /// Takes over entries a silent replica held past the claim timeout.
    fn take_over(&self) -> Vec<(String, String)> {
        let claimed = self.with(|connection| {
            redis::cmd("XAUTOCLAIM")
                .arg(key("queue"))
                .arg(GROUP)
                .arg(&self.consumer)
                .arg(self.limits.claim_timeout.as_millis() as u64)
                .arg("0-0")
                .arg("COUNT")
                .arg(100)
                .query::<Value>(connection)
        });
        let entries = match claimed {
            Ok(Value::Array(parts)) if parts.len() >= 2 => stream_entries(&parts[1]),
            Ok(_) => Vec::new(),
            Err(error) => {
                log::warn!("queue: cannot look for abandoned messages: {error}");
                Vec::new()
            }
        };
        let mine: HashSet<String> = lock(&self.held)
            .values()
            .map(|held| held.ticket.clone())
            .collect();
        let taken: Vec<(String, String)> = entries
            .into_iter()
            .filter(|(ticket, _)| !mine.contains(ticket))
            .collect();
        if !taken.is_empty() {
            log::warn!(
                "queue: took over {} messages a silent replica held",
                taken.len()
            );
        }
        taken
    }
}

/// `[[id, [field, value, ...]], ...]` → `(entry id, message id)`.
fn stream_entries(value: &Value) -> Vec<(String, String)> {
    let Value::Array(entries) = value else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(|entry| {
            let Value::Array(parts) = entry else {
                return None;
            };
            let ticket = text(parts.first()?)?;
            let Value::Array(fields) = parts.get(1)? else {
                return None;
            };
            let id = fields
                .chunks(2)
                .find(|pair| text(&pair[0]).as_deref() == Some("id"))
                .and_then(|pair| pair.get(1).and_then(text))?;
            Some((ticket, id))
        })
        .collect()
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    }
}

/// The index entries of a status: its tags and recipients.
fn index_entries(status: &StatusRecord) -> Vec<String> {
    let mut entries: Vec<String> = status.tags.iter().map(|tag| format!("tag:{tag}")).collect();
    entries.extend(
        status
            .recipients
            .iter()
            .map(|recipient| format!("rcpt:{}", recipient.to_lowercase())),
    );
    entries.sort();
    entries.dedup();
    entries
}

impl RedisStore {
    /// Connects, checks the server, and starts the replica's threads.
    pub(crate) fn open(config: &Config, settings: &RedisSettings) -> io::Result<RedisStore> {
        // Commands are small writes, often several per request: without
        // TCP_NODELAY each would wait on the peer's delayed ACK.
        let info = redis::IntoConnectionInfo::into_connection_info(settings.url.expose())
            .map_err(io_error)?
            .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
        let client = redis::Client::open(info).map_err(io_error)?;
        let endpoint = settings.endpoint();
        let (work_sender, work) = crossbeam_channel::bounded(config.workers);
        let hostname = std::fs::read_to_string("/etc/hostname")
            .map(|name| name.trim().to_string())
            .unwrap_or_else(|_| "replica".into());
        let consumer = format!(
            "{hostname}-{}-{:08x}",
            std::process::id(),
            crate::message::random_u64() as u32
        );
        let shared = Arc::new(Shared {
            latency: Latency::default(),
            client,
            endpoint: endpoint.clone(),
            idle: Mutex::new(Vec::new()),
            reach: Mutex::new(Reach::default()),
            stopping: AtomicBool::new(false),
            consumer,
            limits: Limits {
                capacity: config.queue_capacity,
                scheduled_capacity: config.scheduled_capacity,
                retention: config.status_retention,
                wait_replicas: settings.wait_replicas,
                claim_timeout: settings.claim_timeout,
                rate_interval_ms: (config.rate_limit > 0.0).then(|| 1000.0 / config.rate_limit),
            },
            held: Mutex::new(HashMap::new()),
            observers: Observers::default(),
            work: work_sender,
            accept: Script::new(ACCEPT),
            update: Script::new(UPDATE),
            move_due: Script::new(MOVE_DUE),
            rate: Script::new(RATE),
        });
        // The group must exist before anything reads or adds.
        create_group(&shared)?;
        warn_about_persistence(&shared);
        shared.renew();
        let store = RedisStore {
            shared,
            work,
            threads: Mutex::new(Vec::new()),
        };
        store.start_threads()?;
        log::info!(
            "store: Redis at {endpoint}, replica {}",
            store.shared.consumer
        );
        Ok(store)
    }

    fn start_threads(&self) -> io::Result<()> {
        let mut threads = lock(&self.threads);
        let shared = Arc::clone(&self.shared);
        threads.push(
            std::thread::Builder::new()
                .name("redis-queue".into())
                .spawn(move || run_feeder(&shared))?,
        );
        let shared = Arc::clone(&self.shared);
        threads.push(
            std::thread::Builder::new()
                .name("redis-due".into())
                .spawn(move || run_mover(&shared))?,
        );
        Ok(())
    }
}

/// Reads the queue (new entries and abandoned ones) into the workers'
/// channel, and renews this replica's claims.
fn run_feeder(shared: &Shared) {
    let renew_every = shared.limits.claim_timeout / 3;
    let take_over_every = shared.limits.claim_timeout / 2;
    let mut renewed = Instant::now();
    let mut looked = Instant::now();
    let mut connection: Option<Connection> = None;
    let mut backoff = Duration::from_millis(100);
    while !shared.stopping.load(Ordering::SeqCst) {
        if renewed.elapsed() >= renew_every {
            shared.renew();
            renewed = Instant::now();
        }
        if looked.elapsed() >= take_over_every {
            let taken = shared.take_over();
            shared.feed(taken);
            looked = Instant::now();
        }
        // A connection of its own: the read blocks in Redis for a while.
        let reader = match connection.as_mut() {
            Some(reader) => reader,
            None => match shared.connect().and_then(|reader| {
                reader.set_read_timeout(Some(BLOCK + IO_TIMEOUT))?;
                Ok(reader)
            }) {
                Ok(reader) => connection.insert(reader),
                Err(error) => {
                    let _ = shared.unreachable(error);
                    // Pacing reconnects to an unreachable Redis.
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            },
        };
        let count = shared.work.capacity().unwrap_or(1).max(1);
        let read = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(&shared.consumer)
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(BLOCK.as_millis() as u64)
            .arg("STREAMS")
            .arg(key("queue"))
            .arg(">")
            .query::<Value>(reader);
        match read {
            Ok(Value::Nil) => {}
            Ok(Value::Array(streams)) => {
                backoff = Duration::from_millis(100);
                shared.reachable();
                for stream in streams {
                    if let Value::Array(parts) = stream {
                        if let Some(entries) = parts.get(1) {
                            shared.feed(stream_entries(entries));
                        }
                    }
                }
            }
            Ok(Value::Map(streams)) => {
                for (_, entries) in streams {
                    shared.feed(stream_entries(&entries));
                }
            }
            Ok(_) => {}
            // The group is gone (a Redis that lost its data): make it again.
            Err(error) if error.code() == Some("NOGROUP") => {
                log::warn!("queue: the consumer group is missing in Redis; creating it again");
                if let Err(error) = create_group(shared) {
                    log::error!("queue: cannot create the consumer group: {error}");
                    std::thread::sleep(backoff);
                }
            }
            Err(error) => {
                connection = None;
                let _ = shared.unreachable(error);
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Creates the consumer group (and the stream) unless it exists; `0`
/// takes what is in the stream already.
fn create_group(shared: &Shared) -> io::Result<()> {
    shared.with(|connection| {
        let created = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(key("queue"))
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query::<()>(connection);
        match created {
            Err(error) if error.code() == Some("BUSYGROUP") => Ok(()),
            other => other,
        }
    })
}

/// Moves due retries and scheduled sends into the queue.
fn run_mover(shared: &Shared) {
    const BATCH: usize = 500;
    while !shared.stopping.load(Ordering::SeqCst) {
        let moved = shared.with(|connection| {
            shared
                .move_due
                .arg(PREFIX)
                .arg(now_ms())
                .arg(BATCH)
                .invoke::<usize>(connection)
        });
        if !matches!(moved, Ok(count) if count == BATCH) {
            // Pacing: due times have a resolution of this interval.
            std::thread::sleep(MOVE_EVERY);
        }
    }
}

/// Says at start when the server's settings can lose acknowledged writes.
fn warn_about_persistence(shared: &Shared) {
    let settings: io::Result<Vec<String>> = shared.with(|connection| {
        let mut values = Vec::new();
        for name in ["appendonly", "appendfsync"] {
            let pair: Vec<String> = redis::cmd("CONFIG")
                .arg("GET")
                .arg(name)
                .query(connection)?;
            values.push(pair.get(1).cloned().unwrap_or_default());
        }
        Ok(values)
    });
    match settings.as_deref() {
        Ok([appendonly, appendfsync]) if appendonly == "yes" && appendfsync == "always" => {}
        Ok([appendonly, appendfsync]) if appendonly == "yes" => log::warn!(
            "Redis at {}: appendfsync is {appendfsync}: a Redis crash can lose the last second of \
             accepted messages (set appendfsync always for none)",
            shared.endpoint
        ),
        Ok(_) => log::warn!(
            "Redis at {}: appendonly is off: a Redis restart loses accepted messages since the last \
             snapshot (set appendonly yes and appendfsync always)",
            shared.endpoint
        ),
        Err(error) => log::warn!(
            "Redis at {}: persistence settings unknown ({error}); make sure appendonly is yes",
            shared.endpoint
        ),
    }
}

/// Pending webhooks in Redis: each replica keeps those it queued in a hash
/// of its own (`wh:{replica}`) and delivers them; a replica starting takes
/// over the hashes of replicas that are gone (their `alive:{replica}` key,
/// renewed with the claims, has expired), so each webhook is delivered by
/// one replica.
struct RedisWebhooks {
    shared: Arc<Shared>,
}

const ADOPT: &str = r#"
local p, mine = ARGV[1], ARGV[2]
local taken = 0
local cursor = '0'
repeat
  local page = redis.call('SCAN', cursor, 'MATCH', p..'wh:*', 'COUNT', 100)
  cursor = page[1]
  for _, hash in ipairs(page[2]) do
    local owner = string.sub(hash, #p + 4)
    if owner ~= mine and redis.call('EXISTS', p..'alive:'..owner) == 0 then
      local fields = redis.call('HGETALL', hash)
      for i = 1, #fields, 2 do
        redis.call('HSET', p..'wh:'..mine, fields[i], fields[i + 1])
        taken = taken + 1
      end
      redis.call('DEL', hash)
    end
  end
until cursor == '0'
return taken
"#;

impl super::WebhookQueue for RedisWebhooks {
    fn load(&self) -> Vec<super::PendingWebhook> {
        let shared = &self.shared;
        let own = key(&format!("wh:{}", shared.consumer));
        let loaded: io::Result<Vec<String>> = shared.with(|connection| {
            let taken: i64 = Script::new(ADOPT)
                .arg(PREFIX)
                .arg(&shared.consumer)
                .invoke(connection)?;
            if taken > 0 {
                log::warn!("webhooks: took over {taken} pending from replicas that are gone");
            }
            redis::cmd("HVALS").arg(&own).query(connection)
        });
        match loaded {
            Ok(values) => {
                let mut pending: Vec<super::PendingWebhook> = values
                    .iter()
                    .filter_map(|json| serde_json::from_str(json).ok())
                    .collect();
                pending.sort_by_key(|webhook| webhook.at_ms);
                pending
            }
            Err(error) => {
                log::error!("webhooks: pending ones cannot be read from Redis: {error}");
                Vec::new()
            }
        }
    }

    fn add(&self, webhook: &super::PendingWebhook) -> io::Result<()> {
        let json = serde_json::to_string(webhook).map_err(io::Error::other)?;
        let own = key(&format!("wh:{}", self.shared.consumer));
        self.shared.with(|connection| {
            redis::cmd("HSET")
                .arg(&own)
                .arg(&webhook.id)
                .arg(&json)
                .query::<()>(connection)
        })
    }

    fn complete(&self, id: &str) -> io::Result<()> {
        let own = key(&format!("wh:{}", self.shared.consumer));
        self.shared
            .with(|connection| redis::cmd("HDEL").arg(&own).arg(id).query::<()>(connection))
    }
}

impl Store for RedisStore {
    fn metrics_text(&self) -> String {
        self.shared.latency.render(self.shared.problem().is_none())
    }

    fn webhook_queue(&self) -> io::Result<Arc<dyn super::WebhookQueue>> {
        Ok(Arc::new(RedisWebhooks {
            shared: Arc::clone(&self.shared),
        }))
    }

    fn is_durable(&self) -> bool {
        true
    }

    fn problem(&self) -> Option<String> {
        self.shared.problem()
    }

    fn subscribe(&self, observer: Arc<dyn Observer>) {
        self.shared.observers.add(observer);
    }

    fn work(&self) -> Receiver<Job> {
        self.work.clone()
    }

    fn accept(&self, records: Vec<MessageRecord>) -> Vec<Admission> {
        let shared = &self.shared;
        if records.is_empty() {
            return Vec::new();
        }
        let mut script = shared.accept.prepare_invoke();
        script
            .arg(PREFIX)
            .arg(shared.limits.capacity)
            .arg(shared.limits.scheduled_capacity)
            .arg(records.len());
        for record in &records {
            let status = &record.status;
            let (message, json) = match (
                serde_json::to_string(&*record.message),
                serde_json::to_string(status),
            ) {
                (Ok(message), Ok(json)) => (message, json),
                _ => (String::new(), String::new()),
            };
            let entries = index_entries(status);
            script
                .arg(&status.id)
                .arg(message)
                .arg(json)
                .arg(status.state().as_str())
                .arg(status.next_attempt_at_ms.unwrap_or(0))
                .arg(status.idempotency_key.as_deref().unwrap_or(""))
                .arg(status.fingerprint.as_deref().unwrap_or(""))
                .arg(entries.len())
                .arg(entries);
        }
        let answered: io::Result<Vec<String>> = shared.with(|connection| script.invoke(connection));
        let answered = match answered {
            Ok(answered) => answered,
            Err(error) => {
                return records
                    .iter()
                    .map(|_| Admission::Refused(io::Error::new(error.kind(), error.to_string())))
                    .collect()
            }
        };
        if shared.limits.wait_replicas > 0 && answered.iter().any(|answer| answer == "A") {
            let waited: io::Result<i64> = shared.with(|connection| {
                redis::cmd("WAIT")
                    .arg(shared.limits.wait_replicas)
                    .arg(IO_TIMEOUT.as_millis() as u64)
                    .query(connection)
            });
            let confirmed =
                matches!(waited, Ok(count) if count >= i64::from(shared.limits.wait_replicas));
            if !confirmed {
                let detail = format!(
                    "Redis replicas did not confirm the message (WAIT {}): {}",
                    shared.limits.wait_replicas,
                    waited.map_or_else(|error| error.to_string(), |count| format!("{count} did"))
                );
                log::error!("{detail}");
                return records
                    .iter()
                    .map(|_| Admission::Refused(io::Error::other(detail.clone())))
                    .collect();
            }
        }
        records
            .into_iter()
            .zip(answered)
            .map(|(record, answer)| match answer.as_str() {
                "A" => {
                    let state = record.status.state();
                    match state {
                        State::Scheduled => log::info!("message {}: scheduled", record.status.id),
                        _ => log::info!("message {}: queued", record.status.id),
                    }
                    shared.notify(&record.status, 0);
                    Admission::Accepted(state)
                }
                "C" => Admission::Conflict,
                "F" => Admission::Full,
                "S" => Admission::ScheduleFull,
                repeat if repeat.starts_with('R') => Admission::Repeat(repeat[1..].to_string()),
                other => Admission::Refused(io::Error::other(format!(
                    "unexpected answer {other:?} from the store"
                ))),
            })
            .collect()
    }

    fn accept_waited(&self, mut status: StatusRecord, job: Job) -> Admission {
        // Recorded in the store (any replica shows it), delivered here: the
        // caller waits on this replica.
        status.set_state(State::Sending);
        let record = MessageRecord {
            message: Arc::clone(&job.message),
            status,
        };
        let id = record.status.id.clone();
        let admission = self.accept(vec![record]).pop().unwrap_or(Admission::Full);
        if let Admission::Accepted(_) = admission {
            // Already `sending`: the worker's begin takes it as it is.
            lock(&self.shared.held).remove(&id);
            if self.shared.work.try_send(job).is_err() {
                let mut failed = self.shared.get_status(&id).ok().flatten().map(|(s, _)| s);
                if let Some(status) = failed.as_mut() {
                    status.set_state(State::Failed);
                    status.last_error = Some("no worker could take it".into());
                    self.shared.record(status, "fail", 0);
                }
                return Admission::Full;
            }
            return Admission::Accepted(State::Queued);
        }
        admission
    }

    fn wait_finished(&self, id: &str, deadline: Instant) -> io::Result<Option<StatusRecord>> {
        loop {
            let status = self.shared.get_status(id)?.map(|(status, _)| status);
            match status {
                Some(status) if status.state().is_finished() => return Ok(Some(status)),
                Some(status) if Instant::now() >= deadline => return Ok(Some(status)),
                None => return Ok(None),
                // Polling the shared store (no notification crosses replicas).
                Some(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    fn begin_attempt(&self, id: &str, attempt: u32) -> Result<StatusRecord, Option<State>> {
        let shared = &self.shared;
        let begin = |status: &mut StatusRecord| {
            status.set_state(State::Sending);
            status.attempts = attempt;
            status.next_attempt_at_ms = None;
        };
        let allowed = |state: State| {
            matches!(
                state,
                State::Queued | State::Retrying | State::Scheduled | State::Sending
            )
        };
        // The feeder's read of it: one round trip when nothing changed since.
        let known = lock(&shared.held)
            .get_mut(id)
            .and_then(|held| Some((held.rev.take()?, held.status.take()?)));
        if let Some((rev, mut status)) = known.filter(|(_, status)| allowed(status.state())) {
            begin(&mut status);
            status.updated_at_ms = now_ms();
            status.revision += 1;
            if let Ok(1) = shared.update(&status, &rev, "begin", "", 0) {
                let next = rev.parse::<u64>().map(|rev| (rev + 1).to_string()).ok();
                if let Some(held) = lock(&shared.held).get_mut(id) {
                    held.rev = next;
                }
                return Ok(status);
            }
        }
        let begun = shared.transition(id, allowed, begin, "begin", "", 0);
        match begun {
            Ok((_, status, ())) => {
                // Its revision is not known here any more: finishing reads it.
                Ok(status)
            }
            Err(ActionRefusal::State(state)) => {
                // Cancelled (or finished) meanwhile: its entry is done with.
                if let Some(held) = lock(&shared.held).remove(id) {
                    shared.forget_entry(&held.ticket);
                }
                Err(Some(state))
            }
            Err(ActionRefusal::Unknown) => {
                if let Some(held) = lock(&shared.held).remove(id) {
                    shared.forget_entry(&held.ticket);
                }
                Err(None)
            }
            Err(refusal) => {
                // Not renewed any more: another replica (or this one) takes
                // it over after the claim timeout.
                lock(&shared.held).remove(id);
                log::warn!("message {id}: not sent now, the store is unavailable: {refusal:?}");
                Err(None)
            }
        }
    }

    fn rate_slot(&self) -> Duration {
        let shared = &self.shared;
        let Some(interval) = shared.limits.rate_interval_ms else {
            return Duration::ZERO;
        };
        let waited: io::Result<i64> = shared.with(|connection| {
            shared
                .rate
                .arg(PREFIX)
                .arg(interval.max(1.0).round() as u64)
                .arg(now_ms())
                .invoke(connection)
        });
        match waited {
            Ok(ms) => Duration::from_millis(ms.max(0) as u64),
            // Unreachable: pace locally for now.
            Err(_) => Duration::from_secs_f64(interval / 1000.0),
        }
    }

    fn retry_later(&self, record: MessageRecord, delay: Duration, job: Job, _durable: bool) {
        let due = now_ms() + delay.as_millis() as u64;
        let mut status = record.status;
        status.updated_at_ms = now_ms();
        status.revision += 1;
        drop(job);
        self.shared.record(&status, "retry", due);
    }

    fn finish(&self, mut status: StatusRecord) -> Settling {
        status.updated_at_ms = now_ms();
        status.revision += 1;
        self.shared.record(&status, "finish", 0);
        Settling::done()
    }

    fn fail(&self, record: MessageRecord) {
        let mut status = record.status;
        status.updated_at_ms = now_ms();
        status.revision += 1;
        self.shared.record(&status, "fail", 0);
    }

    fn cancel(&self, id: &str) -> Result<StatusRecord, ActionRefusal> {
        self.shared
            .transition(
                id,
                State::is_cancellable,
                StatusRecord::cancel,
                "cancel",
                "",
                0,
            )
            .map(|(_, status, ())| status)
    }

    fn requeue(&self, id: &str) -> Result<StatusRecord, ActionRefusal> {
        self.shared
            .transition(
                id,
                |state| state == State::Failed,
                StatusRecord::requeue,
                "requeue",
                "",
                self.shared.limits.capacity as u64,
            )
            .map(|(_, status, ())| status)
    }

    fn get(&self, id: &str) -> io::Result<Option<StatusRecord>> {
        Ok(self.shared.get_status(id)?.map(|(status, _)| status))
    }

    fn list(&self, query: &ListQuery) -> io::Result<Result<Page, String>> {
        let shared = &self.shared;
        let limit = query.limit.clamp(1, ListQuery::MAX_LIMIT);
        if let Some(cursor) = &query.cursor {
            if id_key(cursor).is_none() {
                return Ok(Err(format!("invalid cursor {cursor:?}")));
            }
        }
        let recipient = query.recipient.as_ref().map(|r| r.to_lowercase());
        let mut candidates = vec![key("all")];
        if let Some(state) = query.state {
            candidates.push(key(&format!("state:{}", state.as_str())));
        }
        if let Some(tag) = &query.tag {
            candidates.push(key(&format!("tag:{tag}")));
        }
        if let Some(recipient) = &recipient {
            candidates.push(key(&format!("rcpt:{recipient}")));
        }
        let sizes: Vec<u64> = shared.with(|connection| {
            let mut pipe = redis::pipe();
            for candidate in &candidates {
                pipe.cmd("ZCARD").arg(candidate);
            }
            pipe.query(connection)
        })?;
        let base = candidates
            .iter()
            .zip(sizes)
            .min_by_key(|(_, size)| *size)
            .map(|(candidate, _)| candidate.clone())
            .unwrap_or_else(|| key("all"));
        // Ids are 28 hex digits starting with the creation time.
        let mut upper = match query.until {
            Some(until) => format!("({:012x}", to_millis(until) + 1),
            None => "+".to_string(),
        };
        if let Some(cursor) = &query.cursor {
            let from_cursor = format!("({cursor}");
            if upper == "+" || from_cursor < upper {
                upper = from_cursor;
            }
        }
        let lower = match query.since {
            Some(since) => format!("[{:012x}", to_millis(since)),
            None => "-".to_string(),
        };
        let since_ms = query.since.map(to_millis);
        let until_ms = query.until.map(to_millis);
        let mut records = Vec::with_capacity(limit);
        let mut more = false;
        'pages: loop {
            let ids: Vec<String> = shared.with(|connection| {
                redis::cmd("ZREVRANGEBYLEX")
                    .arg(&base)
                    .arg(&upper)
                    .arg(&lower)
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit + 1)
                    .query(connection)
            })?;
            if ids.is_empty() {
                break;
            }
            let last = ids.last().cloned().unwrap_or_default();
            let statuses = shared.get_statuses(&ids)?;
            for status in statuses {
                let matches = query.state.is_none_or(|state| status.state() == state)
                    && query
                        .tag
                        .as_ref()
                        .is_none_or(|tag| status.tags.contains(tag))
                    && recipient.as_ref().is_none_or(|wanted| {
                        status
                            .recipients
                            .iter()
                            .any(|known| known.to_lowercase() == *wanted)
                    })
                    && since_ms.is_none_or(|since| status.created_at_ms >= since)
                    && until_ms.is_none_or(|until| status.created_at_ms <= until);
                if !matches {
                    continue;
                }
                if records.len() == limit {
                    more = true;
                    break 'pages;
                }
                records.push(status);
            }
            if ids.len() <= limit {
                break;
            }
            upper = format!("({last}");
        }
        let next_cursor = if more {
            records
                .last()
                .map(|record: &StatusRecord| record.id.clone())
        } else {
            None
        };
        Ok(Ok(Page {
            records,
            next_cursor,
        }))
    }

    fn counts(&self) -> io::Result<Counts> {
        let shared = &self.shared;
        let (cards, held, scheduled): (Vec<usize>, Option<i64>, Option<i64>) =
            shared.with(|connection| {
                let mut pipe = redis::pipe();
                pipe.cmd("GET").arg(key("held"));
                pipe.cmd("GET").arg(key("scheduled"));
                for state in State::ALL {
                    pipe.cmd("ZCARD")
                        .arg(key(&format!("state:{}", state.as_str())));
                }
                let mut values: Vec<Value> = pipe.query(connection)?;
                let cards: Vec<usize> = values
                    .split_off(2)
                    .iter()
                    .map(|value| redis::from_redis_value::<usize>(value.clone()).unwrap_or(0))
                    .collect();
                let number = |value: &Value| {
                    redis::from_redis_value::<Option<i64>>(value.clone())
                        .ok()
                        .flatten()
                };
                Ok((cards, number(&values[0]), number(&values[1])))
            })?;
        let by_state: HashMap<State, usize> = State::ALL.into_iter().zip(cards).collect();
        let held = held.unwrap_or(0).max(0) as usize;
        Ok(Counts {
            queue_depth: by_state.get(&State::Queued).copied().unwrap_or(0),
            by_state,
            held,
            scheduled: scheduled.unwrap_or(0).max(0) as usize,
            full: held >= shared.limits.capacity,
        })
    }

    fn suppressed(&self, id: &str, recipients: &[String]) -> io::Result<Vec<String>> {
        // Read with the message by the feeder, when it came from there.
        let prefetched = lock(&self.shared.held)
            .get_mut(id)
            .and_then(|held| held.suppressed.take());
        match prefetched {
            Some(suppressed) => Ok(suppressed
                .into_iter()
                .filter(|address| recipients.contains(address))
                .collect()),
            None => self.shared.suppressed_among(recipients),
        }
    }

    fn suppress(&self, address: &str, reason: Option<String>) -> io::Result<Suppression> {
        self.shared
            .put_suppression(address, reason, "HSET")
            .map(|(entry, _)| entry)
    }

    fn suppress_bounced(&self, address: &str, reason: &str) -> io::Result<bool> {
        self.shared
            .put_suppression(address, Some(reason.to_string()), "HSETNX")
            .map(|(_, added)| added)
    }

    fn unsuppress(&self, address: &str) -> io::Result<bool> {
        let normalized = comparable_address(address);
        let (removed, _): (i64, i64) = self.shared.with(|connection| {
            redis::pipe()
                .atomic()
                .cmd("HDEL")
                .arg(key("supp"))
                .arg(&normalized)
                .cmd("ZREM")
                .arg(key("supp:ix"))
                .arg(&normalized)
                .query(connection)
        })?;
        Ok(removed > 0)
    }

    fn suppressions(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> io::Result<(Vec<Suppression>, Option<String>)> {
        let start = cursor.map_or_else(
            || "-".to_string(),
            |cursor| format!("({}", comparable_address(cursor)),
        );
        let shared = &self.shared;
        let keys: Vec<String> = shared.with(|connection| {
            redis::cmd("ZRANGEBYLEX")
                .arg(key("supp:ix"))
                .arg(&start)
                .arg("+")
                .arg("LIMIT")
                .arg(0)
                .arg(limit + 1)
                .query(connection)
        })?;
        let more = keys.len() > limit;
        let keys = &keys[..keys.len().min(limit)];
        if keys.is_empty() {
            return Ok((Vec::new(), None));
        }
        let jsons: Vec<Option<String>> = shared.with(|connection| {
            redis::cmd("HMGET")
                .arg(key("supp"))
                .arg(keys)
                .query(connection)
        })?;
        let page: Vec<Suppression> = jsons
            .into_iter()
            .flatten()
            .filter_map(|json| serde_json::from_str(&json).ok())
            .collect();
        let next = more
            .then(|| page.last().map(|entry| entry.address.clone()))
            .flatten();
        Ok((page, next))
    }

    fn stop(&self, _release_retries: bool) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        for thread in std::mem::take(&mut *lock(&self.threads)) {
            let _ = thread.join();
        }
    }
}
