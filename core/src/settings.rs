//! Configuration from Spin variables (names as declared in `spin.toml`), with the
//! defaults that make `spin up` work against a local Redis.

use crate::layout::Layout;
use crate::redact::{Redactor, server_of};
use crate::tenant::{Quota, Tenancy};
use crate::write::Limits;

/// Everything the components read from variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `redis_address`: the queue's Redis, and the one the doorbell and the
    /// operators' figures use when the shards are spread over several.
    pub redis_address: String,
    /// `shard_redis_addresses`: the servers the shards are spread over (shard `n`
    /// on server `n % len`); empty: every shard on `redis_address`.
    pub shard_redis_addresses: Vec<String>,
    /// `redis_cluster`: every script call touches one shard's keys (one hash
    /// slot), for a Redis Cluster; else a call may cover every shard of one
    /// server (a request's writes enqueued in one round trip).
    pub redis_cluster: bool,
    /// `alarm_db`: the database (on `redis_address`'s server) where each
    /// shard's alarm is mirrored, for its expired-key event to come on time
    /// (see `spillway_spin::mirror`); `None` (empty, or with `redis_cluster`,
    /// which has database 0 only): the alarms' own events alone.
    pub alarm_db: Option<u32>,
    /// `key_prefix` and `shard_count`.
    pub layout: Layout,
    /// `batch_size`: writes applied per transaction.
    pub batch_size: usize,
    /// `round_bytes`: the most bytes of writes one round reads, over all its
    /// shards (each shard's share, at least one write each): what bounds a
    /// processor's memory when values are large.
    pub round_bytes: usize,
    /// `lease_ttl_ms`.
    pub lease_ttl_ms: u64,
    /// `max_attempts`: deliveries before a write is dead-lettered.
    pub max_attempts: u32,
    /// `retry_backoff_ms`: how long a shard whose batch failed waits before
    /// its next delivery, doubling with each failed delivery (0: none).
    pub retry_backoff_ms: u64,
    /// `queue_depth_limit`: entries per shard stream before intake answers 429.
    pub queue_depth_limit: u64,
    /// `scheduled_limit`: scheduled writes (not yet due) per shard before
    /// intake answers 429.
    pub scheduled_limit: u64,
    /// `schedule_horizon_secs`: how far ahead a write may be scheduled.
    pub schedule_horizon_secs: u64,
    /// `idempotency_ttl_secs`.
    pub idempotency_ttl_secs: u64,
    /// `status_retention_secs`: how long a write's outcome stays queryable after the
    /// write was accepted (outcomes are pruned by the processor after that).
    pub status_retention_secs: u64,
    /// `change_feed_secs`: how long one change-feed response streams before it
    /// ends (the client reconnects with `Last-Event-ID`).
    pub change_feed_secs: u64,
    /// `stats_public`: `/v1/stats` and `/metrics` answer without the admin token.
    pub stats_public: bool,
    /// `admin_token`; admin endpoints are disabled when empty.
    pub admin_token: Option<String>,
    /// `database`: `sqlite` (Spin's `default` database) or a PostgreSQL URL
    /// (`postgres://user:password@host:port/name`; a secret).
    pub database: String,
    /// `wake_url`: where a processor is woken over HTTP (`POST <url>?shard=n`),
    /// for platforms without the Redis trigger; `None` rings the doorbell channel
    /// only. E.g. `http://processor.spin.internal/v1/wake` (service chaining).
    pub wake_url: Option<String>,
    /// `drain_budget_secs`: how long one processor invocation drains before it
    /// hands the rest to a fresh one (rings again); 0 = until the queue is empty.
    /// Hosted platforms end a request at 30 s.
    pub drain_budget_secs: u64,
    /// `call_timeout_ms`: how long one call to a dependency (Redis, the
    /// database, the key-value store) may take before it is abandoned and
    /// answered as a timeout; 0 = no limit. Below `lease_ttl_ms` (unset: 2 s,
    /// or half the lease if shorter), so a stalled call cannot outlast the
    /// lease of the processor that made it.
    pub call_timeout_ms: u64,
    /// `request_timeout_ms`: how long a request may take (beyond any wait it
    /// asks for) before it is answered 503; 0 = no limit. At least
    /// `call_timeout_ms`, so that one stalled call is named as such.
    pub request_timeout_ms: u64,
    /// `min_replicas`: how many replicas must hold a request's writes (Redis
    /// `WAIT`) before intake answers 202; 0 = the primary alone.
    pub min_replicas: u32,
    /// `replica_timeout_ms`: how long intake waits for those replicas.
    pub replica_timeout_ms: u64,
    /// `node_name`: this Spin host's name among several sharing the queue
    /// (e.g. the pod's name); `None` (empty): one host, or no spreading. With
    /// it, lease holders name their node and a drain takes only its share of
    /// the shards (see `processor::drain`).
    pub node_name: Option<String>,
    /// `cache_store`: where the record cache lives.
    pub cache_store: CacheStore,
    /// Request limits.
    pub limits: Limits,
    /// `tenant_from`, `tenant_rate`, `tenant_burst`, `tenant_depth`,
    /// `tenant_overrides`: who writes are charged to, and their quotas.
    pub tenancy: Tenancy,
    /// Masks the credentials of the addresses above and the admin token in any
    /// text that leaves a component (see [`crate::redact`]).
    pub redactor: Redactor,
}

impl Settings {
    /// The Redis server holding `shard`'s keys (stream, lease, flags, locks,
    /// statuses): shards are dealt round-robin over `shard_redis_addresses`.
    pub fn redis_for(&self, shard: u32) -> &str {
        match self.shard_redis_addresses.len() {
            0 => &self.redis_address,
            n => &self.shard_redis_addresses[shard as usize % n],
        }
    }

    /// `shards` grouped for script calls: by server, in order of first appearance
    /// (one group per shard with `redis_cluster`, so that no call spans hash
    /// slots).
    pub fn slot_groups<'a>(&'a self, shards: &[u32]) -> Vec<(&'a str, Vec<u32>)> {
        let mut groups: Vec<(&str, Vec<u32>)> = Vec::new();
        for &shard in shards {
            let address = self.redis_for(shard);
            match groups.iter_mut().find(|(a, _)| !self.redis_cluster && *a == address) {
                Some((_, g)) => g.push(shard),
                None => groups.push((address, vec![shard])),
            }
        }
        groups
    }

    /// Where a request's idempotency record lives for the group of `shard`: in
    /// the slot of the first shard on the same server, so one key is one record
    /// per server whatever shards the body touches (a reused key with another
    /// body is refused); with `redis_cluster`, in `shard`'s own slot (a reused
    /// key is then refused only on the shards the first body touched).
    pub fn idempotency_shard(&self, shard: u32) -> u32 {
        if self.redis_cluster {
            return shard;
        }
        let address = self.redis_for(shard);
        (0..self.layout.shards).find(|n| self.redis_for(*n) == address).unwrap_or(shard)
    }

    /// How many shards share `shard`'s tenant quota state (see
    /// [`crate::tenant`]), which lives with its idempotency records: all on
    /// one server, one with `redis_cluster`.
    pub fn tenant_share(&self, shard: u32) -> u32 {
        if self.redis_cluster {
            return 1;
        }
        let address = self.redis_for(shard);
        (0..self.layout.shards).filter(|n| self.redis_for(*n) == address).count() as u32
    }

    /// The shard whose slot holds a server's own bookkeeping keys (hazard
    /// notes): its first shard, so that a cluster node owns them.
    pub fn first_shard_on(&self, address: &str) -> u32 {
        (0..self.layout.shards).find(|n| self.redis_for(*n) == address).unwrap_or(0)
    }

    /// How an answer names the Redis server at `address`, without its
    /// credentials: by the variable that configures it (`redis_address`,
    /// `shard_redis_addresses[i]`), which tells an operator where to look and
    /// tells a client nothing about the network.
    pub fn redis_name(&self, address: &str) -> String {
        if address == self.redis_address {
            return "redis_address".to_owned();
        }
        match self.shard_redis_addresses.iter().position(|a| a == address) {
            Some(i) => format!("shard_redis_addresses[{i}]"),
            None => server_of(address).unwrap_or_else(|| "a Redis server".to_owned()),
        }
    }

    /// `redis_address` with its database replaced by `db`.
    pub fn redis_address_in(&self, db: u32) -> String {
        with_db(&self.redis_address, db)
    }

    /// Every server shards are on, each once, in order.
    pub fn redis_servers(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for shard in 0..self.layout.shards {
            let a = self.redis_for(shard);
            if !out.contains(&a) {
                out.push(a);
            }
        }
        out
    }
}

/// A Redis URL (`redis[s]://[user[:password]@]host:port[/db][?query]`) with
/// its database replaced by (or set to) `db`.
pub fn with_db(address: &str, db: u32) -> String {
    let (scheme, rest) = address.split_once("://").unwrap_or(("redis", address));
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    // The path starts at the first '/' after the user information (a
    // password may hold '/').
    let after_user = rest.rfind('@').map_or(0, |i| i + 1);
    let authority = match rest[after_user..].find('/') {
        Some(i) => &rest[..after_user + i],
        None => rest,
    };
    match query {
        Some(q) => format!("{scheme}://{authority}/{db}?{q}"),
        None => format!("{scheme}://{authority}/{db}"),
    }
}

/// Where the record cache lives (`cache_store`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStore {
    /// `kv`: Spin's key-value store `default` (SQLite under `spin up`, Redis
    /// through runtime config, the platform's store when hosted).
    Kv,
    /// `redis`: in Redis through outbound Redis, each record beside its shard's
    /// keys (its hash slot and server), with its fill lock.
    Redis,
}

/// A variable that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("variable {name}: {reason}")]
pub struct SettingsError {
    /// The variable.
    pub name: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

fn num<T: std::str::FromStr>(get: &impl Fn(&str) -> Option<String>, name: &'static str, default: T) -> Result<T, SettingsError> {
    match get(name) {
        None => Ok(default),
        Some(v) if v.trim().is_empty() => Ok(default),
        Some(v) => v.trim().parse().map_err(|_| SettingsError { name, reason: format!("{v:?} is not a valid number") }),
    }
}

impl Settings {
    /// Reads the settings through `get` (a variable lookup; `None` = use the default).
    // Long on purpose: one variable after another, each read and checked where
    // its field is filled, so that the list reads like the table in
    // docs/variables.md (which a test holds against it).
    pub fn load(get: impl Fn(&str) -> Option<String>) -> Result<Self, SettingsError> {
        let d = Limits::default();
        let shards: u32 = num(&get, "shard_count", 16)?;
        if shards == 0 || shards > 1024 {
            return Err(SettingsError { name: "shard_count", reason: "must be between 1 and 1024".into() });
        }
        let prefix = get("key_prefix").unwrap_or_else(|| "spillway:".into());
        if prefix.is_empty() || prefix.contains(['{', '}', ' ', '*']) {
            return Err(SettingsError { name: "key_prefix", reason: "must be non-empty without braces, spaces or '*'".into() });
        }
        let batch_size = num(&get, "batch_size", 1000)?;
        if batch_size == 0 || batch_size > 10_000 {
            return Err(SettingsError { name: "batch_size", reason: "must be between 1 and 10000".into() });
        }
        let round_bytes = num(&get, "round_bytes", 4 << 20)?;
        if round_bytes == 0 {
            return Err(SettingsError { name: "round_bytes", reason: "must be at least 1".into() });
        }
        let status_retention_secs = num(&get, "status_retention_secs", 604_800)?;
        if status_retention_secs == 0 {
            return Err(SettingsError { name: "status_retention_secs", reason: "must be at least 1".into() });
        }
        let lease_ttl_ms = num(&get, "lease_ttl_ms", 5000)?;
        if lease_ttl_ms == 0 {
            return Err(SettingsError { name: "lease_ttl_ms", reason: "must be at least 1".into() });
        }
        // Unset: 2 s, or half the lease when that is shorter.
        let call_timeout_ms = num(&get, "call_timeout_ms", 2000.min(lease_ttl_ms / 2).max(1))?;
        if call_timeout_ms >= lease_ttl_ms {
            return Err(SettingsError { name: "call_timeout_ms", reason: format!("must be below lease_ttl_ms ({lease_ttl_ms})") });
        }
        let request_timeout_ms = num(&get, "request_timeout_ms", 5000)?;
        if request_timeout_ms != 0 && request_timeout_ms < call_timeout_ms {
            return Err(SettingsError { name: "request_timeout_ms", reason: format!("must be 0 or at least call_timeout_ms ({call_timeout_ms})") });
        }
        let min_replicas = num(&get, "min_replicas", 0)?;
        let replica_timeout_ms = num(&get, "replica_timeout_ms", 1000)?;
        if min_replicas > 0 && (replica_timeout_ms == 0 || (call_timeout_ms != 0 && replica_timeout_ms >= call_timeout_ms)) {
            // WAIT with 0 waits for ever, and the wait is one call.
            return Err(SettingsError { name: "replica_timeout_ms", reason: format!("must be at least 1 and below call_timeout_ms ({call_timeout_ms})") });
        }
        let stats_public = match get("stats_public").as_deref().map(str::trim) {
            None | Some("" | "false") => false,
            Some("true") => true,
            Some(v) => return Err(SettingsError { name: "stats_public", reason: format!("{v:?} is not true or false") }),
        };
        let change_feed_secs = num(&get, "change_feed_secs", 25)?;
        if change_feed_secs == 0 {
            return Err(SettingsError { name: "change_feed_secs", reason: "must be at least 1".into() });
        }
        let database = get("database").map(|d| d.trim().to_owned()).filter(|d| !d.is_empty()).unwrap_or_else(|| "sqlite".into());
        if crate::sql::dialect_for(&database).is_none() {
            // The value may hold a password: it is not repeated.
            return Err(SettingsError { name: "database", reason: "must be sqlite or a postgres:// URL".into() });
        }
        let wake_url = get("wake_url").map(|u| u.trim().to_owned()).filter(|u| !u.is_empty());
        if wake_url.as_deref().is_some_and(|u| !(u.starts_with("http://") || u.starts_with("https://")) || u.contains('?')) {
            return Err(SettingsError { name: "wake_url", reason: "must be an http:// or https:// URL without a query".into() });
        }
        let shard_redis_addresses: Vec<String> =
            get("shard_redis_addresses").unwrap_or_default().split(',').map(str::trim).filter(|a| !a.is_empty()).map(str::to_owned).collect();
        if shard_redis_addresses.len() > shards as usize {
            return Err(SettingsError { name: "shard_redis_addresses", reason: format!("more servers than the {shards} shards") });
        }
        let redis_cluster = match get("redis_cluster").as_deref().map(str::trim) {
            None | Some("" | "false") => false,
            Some("true") => true,
            Some(v) => return Err(SettingsError { name: "redis_cluster", reason: format!("{v:?} is not true or false") }),
        };
        let redis_address = get("redis_address").unwrap_or_else(|| "redis://127.0.0.1:6379".into());
        let alarm_db = match get("alarm_db").as_deref().map(str::trim) {
            None => Some(1),
            Some("") => None,
            Some(v) => Some(v.parse::<u32>().map_err(|_| SettingsError { name: "alarm_db", reason: format!("{v:?} is not a database number") })?),
        }
        .filter(|_| !redis_cluster);
        let admin_token = get("admin_token").filter(|t| !t.is_empty());
        let cache_store = match get("cache_store").as_deref().map(str::trim) {
            None | Some("" | "kv") => CacheStore::Kv,
            Some("redis") => CacheStore::Redis,
            Some(v) => return Err(SettingsError { name: "cache_store", reason: format!("{v:?} is not kv or redis") }),
        };
        let node_name = get("node_name").map(|n| n.trim().to_owned()).filter(|n| !n.is_empty());
        if node_name.as_deref().is_some_and(|n| n.len() > 63 || !n.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))) {
            return Err(SettingsError { name: "node_name", reason: "must be at most 63 letters, digits, '.', '_' or '-'".into() });
        }
        let tenant_default = Quota { rate: num(&get, "tenant_rate", 0)?, burst: num(&get, "tenant_burst", 0)?, depth: num(&get, "tenant_depth", 0)? };
        let tenancy = Tenancy::parse(&get("tenant_from").unwrap_or_default(), tenant_default, &get("tenant_overrides").unwrap_or_default())
            .map_err(|(name, reason)| SettingsError { name, reason })?;
        let redactor = Redactor::new(
            std::iter::once(redis_address.as_str()).chain(shard_redis_addresses.iter().map(String::as_str)).chain([database.as_str()]),
            admin_token.as_deref(),
        );
        Ok(Self {
            tenancy,
            redactor,
            shard_redis_addresses,
            redis_cluster,
            alarm_db,
            wake_url,
            drain_budget_secs: num(&get, "drain_budget_secs", 0)?,
            database,
            redis_address,
            layout: Layout { prefix, shards },
            batch_size,
            round_bytes,
            lease_ttl_ms,
            max_attempts: num(&get, "max_attempts", 5)?,
            retry_backoff_ms: num(&get, "retry_backoff_ms", 500)?,
            queue_depth_limit: num(&get, "queue_depth_limit", 100_000)?,
            scheduled_limit: num(&get, "scheduled_limit", 100_000)?,
            schedule_horizon_secs: num(&get, "schedule_horizon_secs", 604_800)?,
            idempotency_ttl_secs: num(&get, "idempotency_ttl_secs", 86_400)?,
            status_retention_secs,
            change_feed_secs,
            stats_public,
            admin_token,
            call_timeout_ms,
            request_timeout_ms,
            min_replicas,
            replica_timeout_ms,
            node_name,
            cache_store,
            limits: Limits {
                max_body_bytes: num(&get, "max_body_bytes", d.max_body_bytes)?,
                max_batch: num(&get, "max_batch", d.max_batch)?,
                max_key_len: num(&get, "max_key_len", d.max_key_len)?,
                max_value_bytes: num(&get, "max_value_bytes", d.max_value_bytes)?,
                max_json_depth: num(&get, "max_json_depth", d.max_json_depth)?,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database set or replaced in any Redis URL, credentials and query
    /// kept.
    #[test]
    fn addresses_in_another_database() {
        assert_eq!(with_db("redis://127.0.0.1:6379", 1), "redis://127.0.0.1:6379/1");
        assert_eq!(with_db("redis://h:6379/0", 3), "redis://h:6379/3");
        assert_eq!(with_db("rediss://u:p/w@h:6380/2?protocol=resp3", 1), "rediss://u:p/w@h:6380/1?protocol=resp3");
        assert_eq!(with_db("redis://:pw@h:1/", 1), "redis://:pw@h:1/1");
        let s = Settings::load(|_| None).unwrap();
        assert_eq!((s.alarm_db, s.redis_address_in(1)), (Some(1), "redis://127.0.0.1:6379/1".to_owned()));
        assert_eq!(Settings::load(|n| (n == "alarm_db").then(String::new)).unwrap().alarm_db, None);
        assert_eq!(Settings::load(|n| (n == "redis_cluster").then(|| "true".to_owned())).unwrap().alarm_db, None, "a cluster has database 0 only");
        assert_eq!(Settings::load(|n| (n == "alarm_db").then(|| "x".to_owned())).unwrap_err().name, "alarm_db");
    }

    /// With nothing set, the documented defaults apply; bad numbers name the variable.
    #[test]
    fn defaults_and_errors() {
        let s = Settings::load(|_| None).unwrap();
        assert_eq!(s.layout.shards, 16);
        assert_eq!(s.layout.prefix, "spillway:");
        assert_eq!(s.admin_token, None);
        let e = Settings::load(|n| (n == "batch_size").then(|| "many".to_owned())).unwrap_err();
        assert_eq!(e.name, "batch_size");
        // Zero would make Redis refuse `SET .. PX 0` halfway through a script.
        let e = Settings::load(|n| (n == "status_retention_secs").then(|| "0".to_owned())).unwrap_err();
        assert_eq!(e.name, "status_retention_secs");
        assert_eq!(s.database, "sqlite");
        let e = Settings::load(|n| (n == "database").then(|| "mysql://root:hunter2@db/app".to_owned())).unwrap_err();
        assert_eq!(e.name, "database");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert_eq!((s.wake_url.as_deref(), s.drain_budget_secs), (None, 0));
        assert_eq!(s.node_name, None);
        assert_eq!(s.round_bytes, 4 << 20);
        assert_eq!(Settings::load(|n| (n == "round_bytes").then(|| "0".to_owned())).unwrap_err().name, "round_bytes");
        assert_eq!(s.cache_store, CacheStore::Kv);
        assert_eq!(Settings::load(|n| (n == "cache_store").then(|| "redis".to_owned())).unwrap().cache_store, CacheStore::Redis);
        assert_eq!(Settings::load(|n| (n == "cache_store").then(|| "memcached".to_owned())).unwrap_err().name, "cache_store");
        assert_eq!(Settings::load(|n| (n == "node_name").then(|| " pod-7.a_b ".to_owned())).unwrap().node_name.as_deref(), Some("pod-7.a_b"));
        for bad in ["a b", "x~y", "n/1", &"n".repeat(64)] {
            assert_eq!(Settings::load(|n| (n == "node_name").then(|| bad.to_owned())).unwrap_err().name, "node_name", "{bad}");
        }
        assert_eq!((s.redis_for(7), s.redis_servers()), ("redis://127.0.0.1:6379", vec!["redis://127.0.0.1:6379"]));
        let two = Settings::load(|n| (n == "shard_redis_addresses").then(|| "redis://a:6379, redis://b:6379".to_owned())).unwrap();
        assert_eq!((two.redis_for(0), two.redis_for(1), two.redis_for(14)), ("redis://a:6379", "redis://b:6379", "redis://a:6379"));
        assert_eq!(two.redis_servers(), vec!["redis://a:6379", "redis://b:6379"]);
        assert_eq!(two.slot_groups(&[3, 0, 1, 2]), vec![("redis://b:6379", vec![3, 1]), ("redis://a:6379", vec![0, 2])]);
        assert_eq!(s.slot_groups(&[3, 0]), vec![("redis://127.0.0.1:6379", vec![3, 0])]);
        assert_eq!((two.idempotency_shard(7), two.idempotency_shard(6), s.idempotency_shard(9)), (1, 0, 0));
        assert_eq!((two.tenant_share(7), s.tenant_share(9)), (8, 16));
        let cluster = Settings::load(|n| (n == "redis_cluster").then(|| "true".to_owned())).unwrap();
        assert_eq!((cluster.idempotency_shard(9), cluster.tenant_share(9)), (9, 1));
        let e = Settings::load(|n| (n == "tenant_overrides").then(|| "{\"a\": {\"depth\": \"x\"}}".to_owned())).unwrap_err();
        assert_eq!(e.name, "tenant_overrides");
        assert_eq!(Settings::load(|n| (n == "tenant_from").then(|| "body".to_owned())).unwrap_err().name, "tenant_from");
        assert_eq!(cluster.slot_groups(&[3, 0]), vec![("redis://127.0.0.1:6379", vec![3]), ("redis://127.0.0.1:6379", vec![0])]);
        let e = Settings::load(|n| (n == "wake_url").then(|| "processor.spin.internal/v1/wake".to_owned())).unwrap_err();
        assert_eq!(e.name, "wake_url");
        let pg = Settings::load(|n| (n == "database").then(|| "postgres://app@db:5432/app".to_owned())).unwrap();
        assert_eq!(pg.database, "postgres://app@db:5432/app");
    }

    /// A call may not outlast a lease, nor a request its calls; 0 turns both
    /// off, but a request deadline needs call deadlines to name the slow one.
    #[test]
    fn deadlines_fit_the_lease() {
        let load = |vars: &[(&str, &str)]| Settings::load(|n| vars.iter().find(|(k, _)| *k == n).map(|(_, v)| (*v).to_owned()));
        let s = load(&[]).unwrap();
        assert_eq!((s.call_timeout_ms, s.request_timeout_ms, s.lease_ttl_ms), (2000, 5000, 5000));
        assert_eq!(load(&[("lease_ttl_ms", "1000")]).unwrap().call_timeout_ms, 500, "unset: half a short lease");
        assert_eq!(load(&[("lease_ttl_ms", "1000"), ("call_timeout_ms", "1000")]).unwrap_err().name, "call_timeout_ms");
        assert_eq!(load(&[("call_timeout_ms", "900"), ("lease_ttl_ms", "1000"), ("request_timeout_ms", "900")]).unwrap().call_timeout_ms, 900);
        assert_eq!(load(&[("call_timeout_ms", "6000"), ("lease_ttl_ms", "9000")]).unwrap_err().name, "request_timeout_ms");
        let off = load(&[("call_timeout_ms", "0"), ("request_timeout_ms", "0")]).unwrap();
        assert_eq!((off.call_timeout_ms, off.request_timeout_ms), (0, 0));
        assert_eq!((s.min_replicas, s.replica_timeout_ms), (0, 1000));
        assert_eq!(load(&[("min_replicas", "1")]).unwrap().min_replicas, 1);
        assert_eq!(load(&[("min_replicas", "1"), ("replica_timeout_ms", "2000")]).unwrap_err().name, "replica_timeout_ms");
        assert_eq!(load(&[("min_replicas", "1"), ("replica_timeout_ms", "0")]).unwrap_err().name, "replica_timeout_ms");
        assert_eq!(load(&[("replica_timeout_ms", "0")]).unwrap().replica_timeout_ms, 0, "unused without min_replicas");
    }

    /// Servers are named by the variable that sets them, and every configured
    /// credential is masked in texts.
    #[test]
    fn servers_are_named_and_credentials_masked() {
        let vars = [
            ("redis_address", "redis://:queue-pw@10.0.0.1:6379"),
            ("shard_redis_addresses", "redis://u:shard-pw@10.0.0.2:6379, redis://10.0.0.3:6379"),
            ("database", "postgres://app:db-pw-1@db:5432/app"),
            ("admin_token", "admin-tok-9"),
        ];
        let s = Settings::load(|n| vars.iter().find(|(k, _)| *k == n).map(|(_, v)| (*v).to_owned())).unwrap();
        assert_eq!(s.redis_name("redis://:queue-pw@10.0.0.1:6379"), "redis_address");
        assert_eq!(s.redis_name("redis://10.0.0.3:6379"), "shard_redis_addresses[1]");
        assert_eq!(s.redis_name("redis://x:y@elsewhere:1/0"), "redis://elsewhere:1");
        let text = "queue-pw shard-pw db-pw-1 admin-tok-9 10.0.0.1";
        assert_eq!(s.redactor.redact(text), "*** *** *** *** 10.0.0.1");
    }
}
