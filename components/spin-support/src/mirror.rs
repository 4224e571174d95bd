//! Expiry mirrors, for self-healing with the shards on several servers.
//!
//! A shard whose holder died, or whose doorbell was lost, is resumed when its
//! lease or doorbell flag expires: Redis's expired-key event. But a server
//! publishes only its own keys' events, even in a cluster (ordinary messages
//! cross the cluster bus; keyspace events do not), and the Redis trigger
//! listens to one server, `redis_address`. So a shard whose keys live
//! elsewhere (another node of the cluster, another of `shard_redis_addresses`)
//! has its lease and flag mirrored there: a key that expires when the
//! original would have (or a little after), in a slot the trigger's server
//! owns, whose event the trigger hears and which names the shard
//! (`Layout::mirror`). A mirror that fires early finds the shard held and does
//! nothing; so each is set to outlive what it mirrors. Without a Redis trigger
//! (`wake_url`: the HTTP-only deployment, woken by a cron) no event is heard,
//! and nothing is mirrored.
//!
//! A shard's alarm (its next scheduled write) is also mirrored where its own
//! expiry would be heard late: Redis expires keys by sampling those with a TTL,
//! ten times a second, twenty at a time, so among a million keys with a TTL
//! (idempotency records, other applications' keys) a key may expire many
//! minutes after its time. In a database of its own (`alarm_db`, 1 by
//! default), holding only the alarms' mirrors, every one is looked at in each
//! cycle: its event comes within about 100 ms (`hz` 10). The Redis trigger
//! listens to that database's expired-key events too.

use spillway_core::settings::Settings;

use crate::redis::{Redis, bin};

/// What a mirror stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mirrored {
    /// The shard's lease (and watch): set by its holder.
    Lease,
    /// The shard's doorbell flag: set by intake's ring.
    Bell,
    /// The shard's alarm (its next scheduled write): set by intake and the
    /// processor.
    Alarm,
}

impl Mirrored {
    fn name(self) -> &'static str {
        match self {
            Self::Lease => "lease",
            Self::Bell => "bell",
            Self::Alarm => "alarm",
        }
    }
}

/// What [`mirror`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Set (or deleted) the mirror.
    Done,
    /// Nothing: the shard's own expiry is heard (or nothing is).
    Unneeded,
    /// Failed (logged): worth trying again at the next occasion.
    Failed,
}

/// Sets `shard`'s mirror of `what` to expire in `ttl_ms`, or deletes it
/// (`None`), if the shard's keys are on another server than the trigger's.
/// Best effort: a failure is logged (the shard's own expiry on its server and
/// a cron on `/v1/wake` remain).
pub async fn mirror(s: &Settings, shard: u32, what: Mirrored, ttl_ms: Option<u64>) -> Outcome {
    if s.wake_url.is_some() {
        return Outcome::Unneeded;
    }
    if let (Mirrored::Alarm, Some(db)) = (what, s.alarm_db) {
        let key = s.layout.mirror("heal", shard, what.name());
        return match Redis::new(&s.redis_address_in(db)).execute_here(set_or_del(ttl_ms), mirror_args(&key, ttl_ms)).await {
            Ok(_) => Outcome::Done,
            Err(p) => {
                crate::log_ignored("mirroring a shard's alarm in alarm_db", Err::<(), _>(p));
                Outcome::Failed
            }
        };
    }
    let trigger = Redis::new(&s.redis_address);
    let tag = if s.redis_cluster {
        match trigger.tag_here_if_elsewhere(&s.layout.lease(shard)).await {
            Ok(Some(tag)) => tag,
            Ok(None) => return Outcome::Unneeded,
            Err(p) => {
                crate::log_ignored("finding where to mirror a shard's expiry", Err::<(), _>(p));
                return Outcome::Failed;
            }
        }
    } else if s.redis_for(shard) == s.redis_address {
        return Outcome::Unneeded;
    } else {
        "heal".to_owned()
    };
    let key = s.layout.mirror(&tag, shard, what.name());
    match trigger.execute_here(set_or_del(ttl_ms), mirror_args(&key, ttl_ms)).await {
        Ok(_) => Outcome::Done,
        Err(p) => {
            // A resharding may have moved the tag's slot away: found again
            // next time.
            trigger.forget_seed();
            crate::log_ignored("mirroring a shard's expiry on the trigger's server", Err::<(), _>(p));
            Outcome::Failed
        }
    }
}

/// The command that sets a mirror to expire in `ttl_ms`, or deletes it.
fn set_or_del(ttl_ms: Option<u64>) -> &'static str {
    if ttl_ms.is_some() { "SET" } else { "DEL" }
}

/// [`set_or_del`]'s arguments for the mirror `key`.
fn mirror_args(key: &str, ttl_ms: Option<u64>) -> Vec<spin_sdk::redis::RedisParameter> {
    match ttl_ms {
        Some(ms) => vec![bin(key), bin("1"), bin("PX"), bin(&ms.max(1).to_string())],
        None => vec![bin(key)],
    }
}
