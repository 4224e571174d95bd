//! The Redis key layout. Every key lives under one prefix (default `spillway:`); a
//! shard's keys share the hash tag `{s<n>}` so they stay in one Redis Cluster slot.
//! A record key never becomes part of a Redis key as it is: it is hashed (shards,
//! locks) or percent-encoded (cache entries), so no character can escape the layout.

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use md5::{Digest as _, Md5};

/// Consumer group of every shard stream.
pub const GROUP: &str = "spillway";
/// Consumer name; only the lease holder reads a shard, so one name serves all.
pub const CONSUMER: &str = "processor";

/// TTL of a reader's single-flight fill lock: how long a cache fill (one database
/// read and one key-value write) may take at most.
pub const FILL_LOCK_TTL_MS: u64 = 5000;

/// How long a key found absent is remembered (its negative cache entry), at most:
/// its creation drops the entry sooner.
pub const ABSENT_TTL_MS: u64 = 60_000;

/// Prefix and shard count: everything needed to name a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Key prefix, e.g. `spillway:`.
    pub prefix: String,
    /// Number of shards.
    pub shards: u32,
}

/// MD5 of `data` as lower-case hex.
pub fn md5_hex(data: &[u8]) -> String {
    hex::encode(Md5::digest(data))
}

/// What [`encode_key`] leaves as it is: `A-Z a-z 0-9 - . _ ~` (RFC 3986's
/// unreserved characters).
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Percent-encodes everything but `A-Z a-z 0-9 - . _ ~`: injective, and free of
/// `*`, `{`, `}`, `:`, spaces, control and non-ASCII characters.
pub fn encode_key(key: &str) -> String {
    utf8_percent_encode(key, UNRESERVED).to_string()
}

/// Reverses [`encode_key`] (and any percent-encoding of a URL path segment): `None`
/// for a malformed escape (`%` not followed by two hex digits) or bytes that are
/// not UTF-8.
pub fn decode_key(s: &str) -> Option<String> {
    let well_formed = s.match_indices('%').all(|(i, _)| s.get(i + 1..i + 3).is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit())));
    well_formed.then(|| percent_decode_str(s).decode_utf8().ok().map(|c| c.into_owned())).flatten()
}

impl Layout {
    /// The shard of a record key: a stable hash (first 8 bytes of its MD5) modulo
    /// the shard count.
    pub fn shard_of(&self, key: &str) -> u32 {
        let d = Md5::digest(key.as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&d[..8]);
        (u64::from_be_bytes(first) % u64::from(self.shards.max(1))) as u32
    }

    fn shard_key(&self, shard: u32, name: &str) -> String {
        format!("{}{{s{shard}}}:{name}", self.prefix)
    }

    /// The shard's write stream.
    pub fn stream(&self, shard: u32) -> String {
        self.shard_key(shard, "stream")
    }

    /// The shard's lease (the lock).
    pub fn lease(&self, shard: u32) -> String {
        self.shard_key(shard, "lease")
    }

    /// The shard's fencing counter.
    pub fn fence(&self, shard: u32) -> String {
        self.shard_key(shard, "fence")
    }

    /// The shard's watch: set by the lease holder with three times the lease TTL and
    /// deleted on release, so a holder that dies leaves a second, later expiry event
    /// (for an app restart that missed the lease's own).
    pub fn watch(&self, shard: u32) -> String {
        self.shard_key(shard, "watch")
    }

    /// The shard's outcome notices: a short capped stream the processor adds to
    /// whenever writes leave `pending` (acknowledged, dead-lettered), which waiting
    /// status reads block on instead of polling.
    pub fn done(&self, shard: u32) -> String {
        self.shard_key(shard, "done")
    }

    /// The shard's stats: counters per outcome, and per 10-second bucket for
    /// throughput (see `scripts`).
    pub fn stats(&self, shard: u32) -> String {
        self.shard_key(shard, "stats")
    }

    /// Cache hits and misses, counted by the cache instances (one hash, in shard
    /// 0's slot and on its server).
    pub fn cache_stats(&self) -> String {
        self.shard_key(0, "cache-stats")
    }

    /// The Spin hosts (`node_name`) seen draining lately, scored by when (one
    /// sorted set, in shard 0's slot and on its server).
    pub fn nodes(&self) -> String {
        self.shard_key(0, "nodes")
    }

    /// The shard's schedule: the sequences of writes not yet due, a sorted set
    /// scored by due time (ms) (see `scripts::schedule_lua`).
    pub fn sched(&self, shard: u32) -> String {
        self.shard_key(shard, "sched")
    }

    /// The shard's scheduled writes by sequence, and the count of writes ever
    /// scheduled (field `#`), whence the sequences (see `scripts::schedule_lua`).
    pub fn sched_writes(&self, shard: u32) -> String {
        self.shard_key(shard, "sched-w")
    }

    /// The shard's alarm: a key that expires a little before its next
    /// scheduled write is due (`schedule::ALARM_LEAD_MS`), whose expired-key
    /// event wakes a processor; it holds when it fires (ms).
    pub fn alarm(&self, shard: u32) -> String {
        self.shard_key(shard, "alarm")
    }

    /// The tenants' figures where `home` keeps them (see [`crate::tenant`]):
    /// a hash of `d:<tenant>` (writes accepted and not yet settled),
    /// `a:<tenant>` (writes accepted, ever) and `x:<tenant>` (requests
    /// refused by its quotas, ever).
    pub fn tenants(&self, home: u32) -> String {
        self.shard_key(home, "tenants")
    }

    /// A tenant's token bucket where `home` keeps it: `<tokens>:<ms>`, gone
    /// a minute after it is full again (its TTL; absent means full). Tenant
    /// names never hold `{` or `}`.
    pub fn bucket(&self, home: u32, tenant: &str) -> String {
        self.shard_key(home, &format!("bucket:{tenant}"))
    }

    /// The shard's doorbell flag (coalesces wake-ups).
    pub fn bell(&self, shard: u32) -> String {
        self.shard_key(shard, "bell")
    }

    /// Delivery attempts and last errors per pending write.
    pub fn attempts(&self, shard: u32) -> String {
        self.shard_key(shard, "attempts")
    }

    /// While the processor calls the apply step in a careful round (see
    /// `scripts::READ_BATCH`): the ids of the writes in the call, and `-`.
    pub fn applying(&self, shard: u32) -> String {
        self.shard_key(shard, "applying")
    }

    /// Dead-letter stream.
    pub fn dead(&self, shard: u32) -> String {
        self.shard_key(shard, "dead")
    }

    /// Prefix of the per-write status keys of dead writes: `<prefix><entry id>` holds
    /// the error (or `replayed:<new id>`), with the status retention as TTL, so
    /// the index of dead writes stays bounded.
    pub fn dead_status_prefix(&self, shard: u32) -> String {
        self.shard_key(shard, "dead:")
    }

    /// The status key of one dead write (see [`Layout::dead_status_prefix`]).
    pub fn dead_status(&self, shard: u32, entry: &str) -> String {
        format!("{}{entry}", self.dead_status_prefix(shard))
    }

    /// Idempotency record of a client's `Idempotency-Key` for the part of its
    /// request that goes to `shard` (each shard's part is enqueued, and replayed,
    /// on its own: see `scripts::ENQUEUE`).
    pub fn idempotency(&self, shard: u32, client_key: &str) -> String {
        self.shard_key(shard, &format!("idem:{}", md5_hex(client_key.as_bytes())))
    }

    /// Single-flight lock of a record's cache fill; between fills it may hold the
    /// key's negative cache entry (see `scripts::FILL_BEGIN`). In the key's shard
    /// (hash tag), so the processor's refresh of a shard's keys and that shard's
    /// lease are one hash slot.
    pub fn fill_lock(&self, key: &str) -> String {
        self.shard_key(self.shard_of(key), &format!("fill:{}", md5_hex(key.as_bytes())))
    }

    /// Pub/sub channel of the doorbell.
    pub fn doorbell_channel(&self) -> String {
        format!("{}doorbell", self.prefix)
    }

    /// A mirror of `shard`'s lease (`what` = `lease`) or doorbell flag (`bell`)
    /// on the server the Redis trigger listens to, in hash tag `tag` (one that
    /// server owns, in a cluster). Expired-key events are each server's own:
    /// a mirror's expiry is heard where the shard's own keys' is not (see
    /// `spillway_spin::mirror`).
    pub fn mirror(&self, tag: &str, shard: u32, what: &str) -> String {
        format!("{}{{{tag}}}:mirror:{shard}:{what}", self.prefix)
    }

    /// Whether `key` is a mirror (see [`Layout::mirror`]).
    pub fn is_mirror(&self, key: &str) -> bool {
        key.strip_prefix(&self.prefix).is_some_and(|rest| rest.starts_with('{') && rest.contains("}:mirror:"))
    }

    /// The shard whose lease, watch, doorbell flag or alarm `key` is (or a
    /// mirror of one), if it is one of ours: the payload of an expired-key
    /// event that means a processor may have died holding (or before taking)
    /// that shard, or that a scheduled write of it is nearly due.
    pub fn shard_of_expired(&self, key: &str) -> Option<u32> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix('{')?;
        let (shard, name) = match rest.split_once("}:mirror:") {
            Some((_, mirrored)) => mirrored.split_once(':')?,
            None => rest.strip_prefix('s')?.split_once("}:")?,
        };
        let shard: u32 = shard.parse().ok().filter(|s| *s < self.shards)?;
        matches!(name, "lease" | "watch" | "bell" | "alarm").then_some(shard)
    }

    /// A record's cache entry in Redis (`cache_store=redis`): in its shard's
    /// hash slot, beside its fill lock.
    pub fn cached(&self, key: &str) -> String {
        self.shard_key(self.shard_of(key), &format!("rec:{}", encode_key(key)))
    }

    /// Key-value (cache) key of a record.
    pub fn cache_key(&self, key: &str) -> String {
        format!("{}rec:{}", self.prefix, encode_key(key))
    }
}

/// A write id: shard and stream entry id, `"<shard>-<ms>-<seq>"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteId {
    /// Shard number.
    pub shard: u32,
    /// Stream entry id (`<ms>-<seq>`).
    pub entry: String,
}

impl WriteId {
    /// Parses a write id, refusing anything else.
    pub fn parse(s: &str) -> Option<Self> {
        let (shard_text, entry) = s.split_once('-')?;
        if !shard_text.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let shard: u32 = shard_text.parse().ok()?;
        let (ms, seq) = entry.split_once('-')?;
        if ms.is_empty() || seq.is_empty() || !ms.bytes().chain(seq.bytes()).all(|b| b.is_ascii_digit()) {
            return None;
        }
        // Redis stream ids are two 64-bit numbers; anything larger is no write.
        ms.parse::<u64>().ok()?;
        seq.parse::<u64>().ok()?;
        // One spelling per id: no leading zeros (a status key is named by it).
        if [shard_text, ms, seq].iter().any(|part| part.len() > 1 && part.starts_with('0')) {
            return None;
        }
        Some(Self { shard, entry: entry.to_owned() })
    }

    /// The id of the write at stream entry `entry` of `shard`, as text (the
    /// one place that spells it).
    pub fn of_entry(shard: u32, entry: &str) -> String {
        Self { shard, entry: entry.to_owned() }.to_string()
    }
}

impl std::fmt::Display for WriteId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.shard, self.entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shards are stable, in range and spread keys.
    #[test]
    fn shards_are_stable_and_spread() {
        let l = Layout { prefix: "spillway:".into(), shards: 16 };
        assert_eq!(l.shard_of("sku-1"), l.shard_of("sku-1"));
        let used: std::collections::HashSet<u32> = (0..200).map(|i| l.shard_of(&format!("k{i}"))).collect();
        assert!(used.iter().all(|s| *s < 16));
        assert_eq!(used.len(), 16);
        assert_eq!(l.stream(7), "spillway:{s7}:stream");
        assert_eq!(l.stream(7).replace(":stream", ":dead:"), l.dead_status_prefix(7), "as the schedule's move derives it");
        let shard = l.shard_of("sku-1");
        assert_eq!(l.cached("sku-1"), format!("spillway:{{s{shard}}}:rec:sku-1"), "beside the shard's keys");
    }

    /// Expired leases and doorbell flags name their shard; nothing else does.
    #[test]
    fn expired_keys_name_their_shard() {
        let l = Layout { prefix: "spillway:".into(), shards: 16 };
        assert_eq!(l.shard_of_expired(&l.lease(7)), Some(7));
        assert_eq!(l.shard_of_expired(&l.bell(15)), Some(15));
        assert_eq!(l.shard_of_expired(&l.watch(0)), Some(0));
        assert_eq!(l.shard_of_expired(&l.alarm(3)), Some(3));
        assert_eq!(l.shard_of_expired(&l.mirror("heal1", 3, "alarm")), Some(3));
        assert_eq!(l.shard_of_expired(&l.mirror("heal12", 9, "lease")), Some(9));
        assert_eq!(l.shard_of_expired(&l.mirror("heal0", 15, "bell")), Some(15));
        assert_eq!(l.shard_of_expired(&l.mirror("s3", 4, "bell")), Some(4), "a tag like a shard's");
        assert!(l.is_mirror(&l.mirror("heal1", 2, "lease")) && !l.is_mirror(&l.lease(2)));
        for other in [
            l.stream(3),
            l.sched(3),
            l.sched_writes(3),
            l.fill_lock("k"),
            l.idempotency(3, "x"),
            "spillway:{s16}:lease".into(),
            "other:{s1}:lease".into(),
            "spillway:{s1x}:bell".into(),
            l.mirror("heal1", 16, "lease"),
            l.mirror("heal1", 2, "stream"),
            "spillway:{heal1}:mirror:2".into(),
        ] {
            assert_eq!(l.shard_of_expired(&other), None, "{other}");
        }
    }

    /// Encoded keys cannot contain layout characters and never collide.
    #[test]
    fn encoding_is_safe_and_injective() {
        let l = Layout { prefix: "spillway:".into(), shards: 16 };
        for k in ["a b", "*", "{s1}", "x:y", "é", "\u{1}", "a%20b"] {
            let c = l.cache_key(k);
            let tail = c.strip_prefix("spillway:rec:").unwrap();
            assert!(!tail.contains([' ', '*', '{', '}', ':']) && tail.is_ascii(), "{c}");
        }
        assert_ne!(encode_key("a b"), encode_key("a%20b"));
        assert_eq!(decode_key(&encode_key("x:y é%")).as_deref(), Some("x:y é%"));
        assert_eq!(decode_key("%zz"), None);
        assert_eq!(decode_key("%ff"), None);
    }

    /// Write ids round-trip and junk is refused.
    #[test]
    fn write_ids() {
        let id = WriteId::parse("7-1700000000000-3").unwrap();
        assert_eq!((id.shard, id.entry.as_str()), (7, "1700000000000-3"));
        assert_eq!(id.to_string(), "7-1700000000000-3");
        assert!(WriteId::parse("0-1700000000000-0").is_some());
        for bad in ["", "7", "x-1-2", "7-1", "7-1-x", "7-1-2-3", "07-1-2", "7-01-2", "7-1-02", "+7-1-2"] {
            assert!(WriteId::parse(bad).is_none(), "{bad}");
        }
    }
}
