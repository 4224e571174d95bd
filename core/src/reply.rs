//! Typed replies of the Lua scripts ([`crate::scripts`]). Spin's outbound Redis
//! flattens every reply into one list of nil / status / integer / binary values;
//! each script's reply is read here, once, by its type, and a reply of another
//! shape is an error with context, never a default (a malformed lease reply must
//! not read as "lease busy").

/// One value of a flattened reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// Nil.
    Nil,
    /// An integer.
    Int(i64),
    /// A status or bulk string (as text; Spillway's replies are UTF-8).
    Text(String),
}

impl Value {
    /// As an integer (a numeric string too).
    pub fn int(&self) -> Option<i64> {
        match self {
            Self::Int(i) => Some(*i),
            Self::Text(t) => t.parse().ok(),
            Self::Nil => None,
        }
    }

    /// As text (an integer in decimal too).
    pub fn text(&self) -> Option<String> {
        match self {
            Self::Text(t) => Some(t.clone()),
            Self::Int(i) => Some(i.to_string()),
            Self::Nil => None,
        }
    }
}

/// A reply of another shape than its script's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unexpected reply from {script}: {what}")]
pub struct ReplyError {
    /// The script.
    pub script: &'static str,
    /// What is wrong.
    pub what: String,
}

fn bad(script: &'static str, what: impl Into<String>) -> ReplyError {
    ReplyError { script, what: what.into() }
}

fn int_at(script: &'static str, reply: &[Value], i: usize, name: &str) -> Result<i64, ReplyError> {
    reply.get(i).and_then(Value::int).ok_or_else(|| bad(script, format!("{name} (value {i}) is not an integer: {:?}", reply.get(i))))
}

/// `LEASE_ACQUIRE`: the new fencing token, or none when another processor holds
/// the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseAcquired {
    /// Ours, with this fencing token (> 0).
    Won(i64),
    /// Someone else's.
    Busy,
}

impl LeaseAcquired {
    /// Reads the reply: one integer, 0 or a token above it.
    pub fn parse(reply: &[Value]) -> Result<Self, ReplyError> {
        const S: &str = "LEASE_ACQUIRE";
        if reply.len() != 1 {
            return Err(bad(S, format!("{} values, not 1", reply.len())));
        }
        match int_at(S, reply, 0, "the fencing token")? {
            0 => Ok(Self::Busy),
            t if t > 0 => Ok(Self::Won(t)),
            t => Err(bad(S, format!("a negative fencing token {t}"))),
        }
    }
}

/// One entry of a batch: its stream id, the write (JSON text), and which
/// delivery this is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchEntry {
    /// The stream entry id.
    pub id: String,
    /// The write as accepted (JSON text).
    pub payload: String,
    /// 1 for the first delivery.
    pub attempt: i64,
    /// The tenant it is charged to, if any.
    pub tenant: Option<String>,
}

/// `READ_BATCH`: the lease was lost, or a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchRead {
    /// The lease is someone else's now.
    Lost,
    /// A batch (possibly empty).
    Batch {
        /// Outcomes of writes accepted before this may be pruned.
        prune_before_ms: i64,
        /// Where resuming a previous holder's pending entries goes on (`None`:
        /// they are done).
        cursor: Option<String>,
        /// The TTL the shard's alarm was set to (its next scheduled write),
        /// if the read set it.
        armed_ms: Option<u64>,
        /// The entries, in stream order.
        entries: Vec<BatchEntry>,
    },
}

impl BatchRead {
    /// Reads `lost` | `ok, prune_before_ms, cursor, armed_ms, (entry id, payload,
    /// attempt, tenant)*`.
    pub fn parse(reply: &[Value]) -> Result<Self, ReplyError> {
        const S: &str = "READ_BATCH";
        match reply.first().and_then(Value::text).as_deref() {
            Some("lost") => return Ok(Self::Lost),
            Some("ok") => {}
            other => return Err(bad(S, format!("it starts with {other:?}, not ok or lost"))),
        }
        let prune_before_ms = int_at(S, reply, 1, "prune_before_ms")?;
        let cursor = reply.get(2).ok_or_else(|| bad(S, "no cursor"))?.text().filter(|c| !c.is_empty());
        let armed_ms = u64::try_from(int_at(S, reply, 3, "armed_ms")?).ok();
        let rest = &reply[4..];
        if !rest.len().is_multiple_of(4) {
            return Err(bad(S, format!("{} entry values are not whole (id, payload, attempt, tenant) quadruples", rest.len())));
        }
        let entries = rest
            .chunks(4)
            .enumerate()
            .map(|(i, c)| {
                Ok(BatchEntry {
                    id: c[0].text().ok_or_else(|| bad(S, format!("entry {i} has no id")))?,
                    payload: c[1].text().ok_or_else(|| bad(S, format!("entry {i} has no payload")))?,
                    attempt: c[2].int().ok_or_else(|| bad(S, format!("entry {i}'s attempt is not an integer")))?,
                    tenant: c[3].text().filter(|t| !t.is_empty()),
                })
            })
            .collect::<Result<_, ReplyError>>()?;
        Ok(Self::Batch { prune_before_ms, cursor, armed_ms, entries })
    }
}

/// `ENQUEUE`: what one call did with its writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enqueued {
    /// Accepted (`replay`: as the first request with this idempotency key and
    /// body was): the ids of the call's writes, in order.
    Accepted {
        /// The write ids.
        ids: Vec<String>,
        /// A replay of an earlier request.
        replay: bool,
    },
    /// The idempotency key was used with another body.
    Conflict,
    /// This shard is over its queue depth limit: nothing was added.
    Full {
        /// The shard.
        shard: String,
    },
    /// This shard is over its scheduled-write limit: nothing was added.
    FullScheduled {
        /// The shard.
        shard: String,
    },
    /// The call's `index`-th write (from 0) is due too far in the past:
    /// nothing was added.
    Past {
        /// Which write of the call.
        index: usize,
    },
    /// A tenant's writes would not fit its quota: nothing was added.
    Throttled {
        /// Which tenant of the call (from 0).
        tenant: usize,
        /// Which quota.
        by: Throttle,
    },
}

/// Which of a tenant's quotas refused an `ENQUEUE` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttle {
    /// Its depth: it holds this many writes not yet settled.
    Depth(u64),
    /// Its depth: the call alone has more entries than this depth.
    OverDepth(u64),
    /// Its rate: its bucket has the tokens in `retry_ms`; it holds
    /// `tokens_milli` thousandths of a token now.
    Rate {
        /// When the call's writes would fit.
        retry_ms: u64,
        /// The bucket now, in thousandths of a token.
        tokens_milli: u64,
    },
    /// Its burst: the call has more of its writes than its bucket holds.
    Burst(u64),
}

/// What an `ENQUEUE` call asks its caller to pass on, whatever else it says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rung {
    /// The shards to ring.
    pub rang: Vec<u32>,
    /// The shards whose alarm the call set, and its TTL (ms).
    pub armed: Vec<(u32, u64)>,
}

impl Enqueued {
    /// Reads `ok, id*[, rang, shard*][, armed, (shard, ttl_ms)*]` | `replay,
    /// id*` | `conflict` | `full, shard` | `full-scheduled, shard` | `past, i` |
    /// `tenant-full|tenant-rate|tenant-burst, j, figure`, and the
    /// shards the call rang and armed (whatever else it says: a ring must not
    /// be lost).
    pub fn parse(reply: &[Value]) -> Result<(Self, Rung), ReplyError> {
        const S: &str = "ENQUEUE";
        let texts: Vec<String> = reply.iter().map(|v| v.text().ok_or_else(|| bad(S, "a nil value"))).collect::<Result<_, _>>()?;
        let (head, rest) = texts.split_first().ok_or_else(|| bad(S, "an empty reply"))?;
        let (rest, armed) = match rest.iter().position(|v| v == "armed") {
            Some(at) => (&rest[..at], &rest[at + 1..]),
            None => (rest, &[][..]),
        };
        let (values, rang) = match rest.iter().position(|v| v == "rang") {
            Some(at) => (&rest[..at], &rest[at + 1..]),
            None => (rest, &[][..]),
        };
        let number = |v: &String| v.parse::<u32>().map_err(|_| bad(S, format!("a rung shard {v:?}")));
        let rang = rang.iter().map(number).collect::<Result<Vec<_>, _>>()?;
        if !armed.len().is_multiple_of(2) {
            return Err(bad(S, "an armed shard without its TTL"));
        }
        let armed = armed
            .chunks(2)
            .map(|p| Ok((number(&p[0])?, p[1].parse::<u64>().map_err(|_| bad(S, format!("an alarm TTL {:?}", p[1])))?)))
            .collect::<Result<Vec<_>, _>>()?;
        let shard = || values.first().cloned().ok_or_else(|| bad(S, format!("{head} without a shard")));
        let outcome = match head.as_str() {
            "ok" | "replay" => Self::Accepted { ids: values.to_vec(), replay: head == "replay" },
            "conflict" => Self::Conflict,
            "full" => Self::Full { shard: shard()? },
            "full-scheduled" => Self::FullScheduled { shard: shard()? },
            "past" => Self::Past {
                index: shard()?.parse::<usize>().ok().and_then(|i| i.checked_sub(1)).ok_or_else(|| bad(S, "past without a write's place"))?,
            },
            "tenant-full" | "tenant-over-depth" | "tenant-rate" | "tenant-burst" => {
                let tenant = shard()?.parse::<usize>().ok().and_then(|i| i.checked_sub(1)).ok_or_else(|| bad(S, format!("{head} without a tenant")))?;
                let figure = |i: usize| values.get(i).and_then(|v| v.parse::<u64>().ok()).ok_or_else(|| bad(S, format!("{head} without its figure {i}")));
                let by = match head.as_str() {
                    "tenant-full" => Throttle::Depth(figure(1)?),
                    "tenant-over-depth" => Throttle::OverDepth(figure(1)?),
                    "tenant-rate" => Throttle::Rate { retry_ms: figure(1)?, tokens_milli: figure(2)? },
                    _ => Throttle::Burst(figure(1)?),
                };
                Self::Throttled { tenant, by }
            }
            other => return Err(bad(S, format!("it starts with {other:?}"))),
        };
        Ok((outcome, Rung { rang, armed }))
    }
}

/// `FILL_BEGIN`: whether this reader fills the cache for a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillBegin {
    /// The fill lock is ours: read the database and fill.
    Mine,
    /// Another reader is filling: wait for it.
    Busy,
    /// The key is known to be absent (the negative entry).
    Absent,
}

impl FillBegin {
    /// Reads 1 | 0 | 2.
    pub fn parse(reply: &[Value]) -> Result<Self, ReplyError> {
        const S: &str = "FILL_BEGIN";
        match (reply.len(), int_at(S, reply, 0, "the grant")?) {
            (1, 1) => Ok(Self::Mine),
            (1, 0) => Ok(Self::Busy),
            (1, 2) => Ok(Self::Absent),
            (n, v) => Err(bad(S, format!("{n} values, the first {v}"))),
        }
    }
}

/// One lock of `LOCKS_ACQUIRE` / `LOCKS_ACQUIRE_LEASED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// Taken.
    Taken,
    /// Someone else holds it.
    Busy,
    /// Its shard's lease is no longer ours (`LOCKS_ACQUIRE_LEASED` only).
    LeaseLost,
}

impl Grant {
    /// Reads one grant per lock asked for (`n`): 1 | 0 | 2.
    pub fn parse_all(reply: &[Value], n: usize) -> Result<Vec<Self>, ReplyError> {
        const S: &str = "LOCKS_ACQUIRE";
        if reply.len() != n {
            return Err(bad(S, format!("{} grants for {n} locks", reply.len())));
        }
        (0..n)
            .map(|i| match int_at(S, reply, i, "a grant")? {
                1 => Ok(Self::Taken),
                0 => Ok(Self::Busy),
                2 => Ok(Self::LeaseLost),
                v => Err(bad(S, format!("grant {i} is {v}"))),
            })
            .collect()
    }
}

/// `CLAIMABLE`: the shards with work and no lease holder, how soon the next
/// scheduled write of the others is due (within the alarm's lead), and the
/// alarms the call set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claimable {
    /// Milliseconds until the soonest scheduled write of an unheld shard is
    /// due, if within the lead.
    pub wait_ms: Option<u64>,
    /// The claimable shards.
    pub shards: Vec<u32>,
    /// The shards whose alarm was set, and its TTL (ms).
    pub armed: Vec<(u32, u64)>,
}

/// Reads `wait_ms, n, shard{n}, (shard, ttl_ms)*`.
pub fn claimable(reply: &[Value]) -> Result<Claimable, ReplyError> {
    const S: &str = "CLAIMABLE";
    let wait_ms = u64::try_from(int_at(S, reply, 0, "wait_ms")?).ok();
    let n = usize::try_from(int_at(S, reply, 1, "the number of claimable shards")?).map_err(|_| bad(S, "a negative count"))?;
    let number = |i: usize| {
        let v = reply.get(i).ok_or_else(|| bad(S, format!("no value {i}")))?;
        v.int().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| bad(S, format!("value {i} is not a shard: {v:?}")))
    };
    let shards = (2..2 + n).map(number).collect::<Result<_, _>>()?;
    let rest = reply.len().checked_sub(2 + n).ok_or_else(|| bad(S, "fewer shards than counted"))?;
    if !rest.is_multiple_of(2) {
        return Err(bad(S, "an armed shard without its TTL"));
    }
    let armed = (0..rest / 2).map(|j| Ok((number(2 + n + 2 * j)?, number(3 + n + 2 * j)?.into()))).collect::<Result<_, ReplyError>>()?;
    Ok(Claimable { wait_ms, shards, armed })
}

/// `NODES_SEEN`: each node seen and how long ago (ms), by name.
pub fn nodes_seen(reply: &[Value]) -> Result<Vec<(String, u64)>, ReplyError> {
    let now = reply.first().and_then(Value::int).ok_or_else(|| bad("NODES_SEEN", "no time"))?;
    reply[1..]
        .chunks(2)
        .map(|pair| match pair {
            [name, seen] => Ok((name.text().ok_or_else(|| bad("NODES_SEEN", "a name that is no text"))?, now.saturating_sub(seen.int().ok_or_else(|| bad("NODES_SEEN", "a time that is no number"))?).max(0) as u64)),
            _ => Err(bad("NODES_SEEN", "a name without its time")),
        })
        .collect()
}

/// `SHARD_STATS`: one shard's figures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardStats {
    /// Entries in the stream.
    pub depth: u64,
    /// Delivered and not acknowledged.
    pub unacknowledged: u64,
    /// The oldest entry's id, if any.
    pub oldest: Option<String>,
    /// Entries in the dead-letter stream.
    pub dead_letters: u64,
    /// The lease holder's token, if held.
    pub holder: Option<String>,
    /// The lease's time left (ms; negative when none).
    pub lease_ms_left: i64,
    /// Redis's clock (ms since the epoch).
    pub now_ms: u64,
    /// Scheduled writes not yet in the stream.
    pub scheduled: u64,
    /// When the next of them is due (ms since the epoch).
    pub next_due_ms: Option<u64>,
    /// The stats hash, field by field.
    pub counters: Vec<(String, u64)>,
}

impl ShardStats {
    /// Reads `depth, unacknowledged, oldest, dead letters, holder, lease ms left,
    /// now ms, scheduled, next due ms, (field, value)*`.
    pub fn parse(reply: &[Value]) -> Result<Self, ReplyError> {
        const S: &str = "SHARD_STATS";
        if reply.len() < 9 || reply.len().is_multiple_of(2) {
            return Err(bad(S, format!("{} values", reply.len())));
        }
        let count = |i: usize, name: &str| int_at(S, reply, i, name).map(|n| n.max(0) as u64);
        let text = |i: usize| reply[i].text().filter(|t| !t.is_empty());
        let counters = reply[9..]
            .chunks(2)
            .map(|p| match (p[0].text(), p[1].int()) {
                (Some(f), Some(v)) => Ok((f, v.max(0) as u64)),
                _ => Err(bad(S, format!("a counter pair {p:?}"))),
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            depth: count(0, "depth")?,
            unacknowledged: count(1, "unacknowledged")?,
            oldest: text(2),
            dead_letters: count(3, "dead letters")?,
            holder: text(4),
            lease_ms_left: int_at(S, reply, 5, "the lease's time left")?,
            now_ms: count(6, "now")?,
            scheduled: count(7, "scheduled")?,
            next_due_ms: u64::try_from(int_at(S, reply, 8, "next due")?).ok(),
            counters,
        })
    }
}

/// A reply of `(text, text)*` pairs.
fn pairs(script: &'static str, reply: &[Value]) -> Result<Vec<(String, String)>, ReplyError> {
    if !reply.len().is_multiple_of(2) {
        return Err(bad(script, format!("{} values are not whole pairs", reply.len())));
    }
    reply
        .chunks(2)
        .map(|p| match (p[0].text(), p[1].text()) {
            (Some(a), Some(b)) => Ok((a, b)),
            _ => Err(bad(script, format!("a pair {p:?}"))),
        })
        .collect()
}

/// `REPLAY`: `(old write id, new write id)*`.
pub fn replayed(reply: &[Value]) -> Result<Vec<(String, String)>, ReplyError> {
    pairs("REPLAY", reply)
}

/// `PURGE`: the purged write ids.
pub fn purged(reply: &[Value]) -> Result<Vec<String>, ReplyError> {
    reply.iter().enumerate().map(|(i, v)| v.text().ok_or_else(|| bad("PURGE", format!("value {i} is nil")))).collect()
}

/// `XREAD` of one stream, flattened: nothing (timed out), or the stream's name
/// then `(entry id, field, value)` per entry. The newest entry's id, if any.
pub fn newest_entry(reply: &[Value]) -> Result<Option<String>, ReplyError> {
    const S: &str = "XREAD";
    let entries = match reply {
        [] | [Value::Nil] => return Ok(None),
        [_stream, rest @ ..] => rest,
    };
    if !entries.len().is_multiple_of(3) {
        return Err(bad(S, format!("{} values are not whole (id, field, value) entries", entries.len())));
    }
    entries.chunks(3).next_back().map(|c| c[0].text().ok_or_else(|| bad(S, "an entry without an id"))).transpose()
}

/// `CONFIG GET name*`: the `(name, value)` pairs, as a lookup (a setting the
/// server does not have is absent).
pub fn config(reply: &[Value]) -> Result<std::collections::HashMap<String, String>, ReplyError> {
    Ok(pairs("CONFIG GET", reply)?.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Value {
        Value::Text(s.into())
    }

    /// A lease reply reads as won or busy; anything else is an error, not
    /// "busy".
    #[test]
    fn lease_replies() {
        assert_eq!(LeaseAcquired::parse(&[Value::Int(7)]), Ok(LeaseAcquired::Won(7)));
        assert_eq!(LeaseAcquired::parse(&[Value::Int(0)]), Ok(LeaseAcquired::Busy));
        assert_eq!(LeaseAcquired::parse(&[t("12")]), Ok(LeaseAcquired::Won(12)));
        for bad in [vec![], vec![Value::Nil], vec![t("OK")], vec![Value::Int(-1)], vec![Value::Int(1), Value::Int(2)]] {
            assert!(LeaseAcquired::parse(&bad).is_err(), "{bad:?}");
        }
    }

    /// The nodes seen read with their ages; a torn list is an error.
    #[test]
    fn nodes_seen_replies() {
        assert_eq!(nodes_seen(&[Value::Int(5000), t("a"), Value::Int(4000), t("b"), t("5000")]), Ok(vec![("a".into(), 1000), ("b".into(), 0)]));
        assert_eq!(nodes_seen(&[Value::Int(1)]), Ok(vec![]));
        for bad in [vec![], vec![Value::Int(1), t("a")], vec![Value::Int(1), t("a"), t("x")]] {
            assert!(nodes_seen(&bad).is_err(), "{bad:?}");
        }
    }

    /// A batch reply reads into its entries; a torn one is an error.
    #[test]
    fn batch_replies() {
        assert_eq!(BatchRead::parse(&[t("lost")]), Ok(BatchRead::Lost));
        let ok = [t("ok"), Value::Int(5), t(""), Value::Int(-1), t("1-0"), t("{}"), Value::Int(1), t(""), t("1-1"), t("[]"), Value::Int(3), t("acme")];
        let BatchRead::Batch { prune_before_ms, cursor, armed_ms, entries } = BatchRead::parse(&ok).unwrap() else { panic!() };
        assert_eq!((prune_before_ms, cursor, armed_ms, entries.len(), entries[1].attempt), (5, None, None, 2, 3));
        assert_eq!((entries[0].tenant.as_deref(), entries[1].tenant.as_deref()), (None, Some("acme")));
        assert_eq!(
            BatchRead::parse(&[t("ok"), Value::Int(0), t("0-5"), Value::Int(700)]).unwrap(),
            BatchRead::Batch { prune_before_ms: 0, cursor: Some("0-5".into()), armed_ms: Some(700), entries: vec![] }
        );
        assert!(BatchRead::parse(&ok[..11]).is_err());
        assert!(BatchRead::parse(&[t("ok"), Value::Nil, t(""), Value::Int(-1)]).is_err());
        assert!(BatchRead::parse(&[t("ok"), Value::Int(0), t("")]).is_err(), "no armed_ms");
        assert!(BatchRead::parse(&[]).is_err());
        assert!(BatchRead::parse(&[t("OK")]).is_err());
    }

    /// The other scripts' replies read by type, and refuse other shapes.
    #[test]
    fn other_replies() {
        let (e, rung) = Enqueued::parse(&[t("ok"), t("1-1-0"), t("1-2-0"), t("rang"), Value::Int(1)]).unwrap();
        assert_eq!((e, rung.rang, rung.armed), (Enqueued::Accepted { ids: vec!["1-1-0".into(), "1-2-0".into()], replay: false }, vec![1], vec![]));
        let (e, rung) = Enqueued::parse(&[t("ok"), t("2-9-0"), t("armed"), Value::Int(2), Value::Int(8500)]).unwrap();
        assert_eq!((e, rung), (Enqueued::Accepted { ids: vec!["2-9-0".into()], replay: false }, Rung { rang: vec![], armed: vec![(2, 8500)] }));
        let (_, rung) = Enqueued::parse(&[t("ok"), t("2-9-0"), t("rang"), t("2"), t("armed"), t("2"), t("10")]).unwrap();
        assert_eq!(rung, Rung { rang: vec![2], armed: vec![(2, 10)] });
        assert!(Enqueued::parse(&[t("ok"), t("2-9-0"), t("armed"), t("2")]).is_err());
        assert_eq!(Enqueued::parse(&[t("full-scheduled"), t("4")]).unwrap().0, Enqueued::FullScheduled { shard: "4".into() });
        assert_eq!(Enqueued::parse(&[t("replay"), t("1-1-0")]).unwrap().0, Enqueued::Accepted { ids: vec!["1-1-0".into()], replay: true });
        assert_eq!(Enqueued::parse(&[t("full"), t("3")]).unwrap().0, Enqueued::Full { shard: "3".into() });
        let (full, rung) = Enqueued::parse(&[t("full"), t("3"), t("rang"), t("5")]).unwrap();
        assert_eq!((full, rung.rang), (Enqueued::Full { shard: "3".into() }, vec![5]), "a refused call rings what it moved");
        assert_eq!(Enqueued::parse(&[t("conflict")]).unwrap().0, Enqueued::Conflict);
        assert!(Enqueued::parse(&[t("full")]).is_err() && Enqueued::parse(&[]).is_err() && Enqueued::parse(&[t("what")]).is_err());
        assert!(Enqueued::parse(&[t("ok"), t("rang"), t("x")]).is_err());
        assert_eq!(FillBegin::parse(&[Value::Int(2)]), Ok(FillBegin::Absent));
        assert!(FillBegin::parse(&[Value::Int(3)]).is_err() && FillBegin::parse(&[]).is_err());
        assert_eq!(Grant::parse_all(&[Value::Int(1), Value::Int(0), Value::Int(2)], 3), Ok(vec![Grant::Taken, Grant::Busy, Grant::LeaseLost]));
        assert!(Grant::parse_all(&[Value::Int(1)], 2).is_err());
        assert_eq!(claimable(&[Value::Int(-1), Value::Int(2), Value::Int(3), t("5")]), Ok(Claimable { wait_ms: None, shards: vec![3, 5], armed: vec![] }));
        assert_eq!(claimable(&[Value::Int(120), Value::Int(0), Value::Int(4), Value::Int(500)]), Ok(Claimable { wait_ms: Some(120), shards: vec![], armed: vec![(4, 500)] }));
        for bad in [vec![Value::Int(-1), Value::Int(1), Value::Int(-1)], vec![], vec![Value::Int(-1), Value::Int(2), Value::Int(3)], vec![Value::Int(-1), Value::Int(0), Value::Int(4)]] {
            assert!(claimable(&bad).is_err(), "{bad:?}");
        }
        assert_eq!(Enqueued::parse(&[t("past"), t("2")]).unwrap().0, Enqueued::Past { index: 1 });
        let (e, rung) = Enqueued::parse(&[t("tenant-rate"), t("2"), t("250"), t("1500"), t("rang"), t("3")]).unwrap();
        assert_eq!((e, rung.rang), (Enqueued::Throttled { tenant: 1, by: Throttle::Rate { retry_ms: 250, tokens_milli: 1500 } }, vec![3]));
        assert_eq!(Enqueued::parse(&[t("tenant-over-depth"), t("1"), t("2")]).unwrap().0, Enqueued::Throttled { tenant: 0, by: Throttle::OverDepth(2) });
        assert_eq!(Enqueued::parse(&[t("tenant-full"), t("1"), t("40"), t("rang")]).unwrap().0, Enqueued::Throttled { tenant: 0, by: Throttle::Depth(40) });
        assert_eq!(Enqueued::parse(&[t("tenant-burst"), t("1"), t("5")]).unwrap().0, Enqueued::Throttled { tenant: 0, by: Throttle::Burst(5) });
        assert!(Enqueued::parse(&[t("tenant-rate"), t("1"), t("5")]).is_err() && Enqueued::parse(&[t("tenant-rate"), t("0"), t("5"), t("1")]).is_err());
        assert!(Enqueued::parse(&[t("past"), t("0")]).is_err());
        let st = ShardStats::parse(&[
            Value::Int(4), Value::Int(1), t("17-0"), Value::Int(0), t(""), Value::Int(-2), Value::Int(20), Value::Int(3), Value::Int(90), t("accepted"), t("4"),
        ])
        .unwrap();
        assert_eq!((st.depth, st.oldest.as_deref(), st.holder, st.counters), (4, Some("17-0"), None, vec![("accepted".into(), 4)]));
        assert_eq!((st.scheduled, st.next_due_ms), (3, Some(90)));
        assert!(ShardStats::parse(&[Value::Int(4)]).is_err());
        assert_eq!(replayed(&[t("1-1-0"), t("1-9-0")]), Ok(vec![("1-1-0".into(), "1-9-0".into())]));
        assert!(replayed(&[t("1-1-0")]).is_err());
        assert_eq!(purged(&[t("1-1-0")]), Ok(vec!["1-1-0".into()]));
        assert!(purged(&[Value::Nil]).is_err());
        assert_eq!(newest_entry(&[]), Ok(None));
        assert_eq!(newest_entry(&[Value::Nil]), Ok(None));
        assert_eq!(newest_entry(&[t("s"), t("1-0"), t("v"), Value::Int(1), t("2-0"), t("v"), Value::Int(2)]), Ok(Some("2-0".into())));
        assert!(newest_entry(&[t("s"), t("1-0")]).is_err());
        let c = config(&[t("appendonly"), t("yes"), t("maxmemory-policy"), t("noeviction")]).unwrap();
        assert_eq!((c["appendonly"].as_str(), c.get("notify-keyspace-events")), ("yes", None));
        assert!(config(&[t("appendonly")]).is_err());
    }
}
