//! Redis settings Spillway depends on, and what to do about each (the decision; the
//! components do the I/O).
//!
//! - `notify-keyspace-events` must include `Ex` (expired-key events): a shard lease
//!   or doorbell flag that expires because its processor died is what wakes a
//!   processor to resume that shard with no further traffic. Spillway turns it on
//!   (`CONFIG SET`) where Redis allows; a Redis restart forgets it unless it is in
//!   the Redis configuration file, so every new instance checks again.
//! - `maxmemory-policy` must be `noeviction`: any other policy lets Redis drop queued
//!   writes or leases under memory pressure.
//! - `appendonly` should be `yes`: without it, writes accepted since the last
//!   snapshot are lost when Redis crashes.

/// The kinds of hazard, as the `kind` label of `spillway_redis_hazards`
/// names them: what [`kind`] tells a warning of this module by.
pub const KINDS: [&str; 5] = ["eviction_policy", "appendonly_off", "expiry_events_off", "config_unreadable", "unreachable"];

/// The kind of a warning made by this module (a cluster node's, prefixed
/// with it, included); any other (a server failing when read) is
/// `unreachable`.
pub fn kind(warning: &str) -> &'static str {
    if warning.contains("Redis maxmemory-policy is ") {
        KINDS[0]
    } else if warning.contains("Redis appendonly is off") {
        KINDS[1]
    } else if warning.contains("Redis keyspace expiry events are off") {
        KINDS[2]
    } else if warning.contains("cannot read the Redis configuration") {
        KINDS[3]
    } else {
        KINDS[4]
    }
}

/// Whether `flags` (a `notify-keyspace-events` value) publish expired-key events.
pub fn has_expiry_events(flags: &str) -> bool {
    flags.contains('E') && (flags.contains('x') || flags.contains('A'))
}

/// The `notify-keyspace-events` value to set so that `flags` also publish expired-key
/// events, or `None` when they already do.
pub fn with_expiry_events(flags: &str) -> Option<String> {
    (!has_expiry_events(flags)).then(|| format!("{flags}Ex"))
}

/// Warnings about an eviction policy and AOF setting (as `CONFIG GET` gives them).
pub fn assess(maxmemory_policy: &str, appendonly: &str) -> Vec<String> {
    let mut warnings = Vec::new();
    if !maxmemory_policy.is_empty() && maxmemory_policy != "noeviction" {
        warnings.push(format!(
            "Redis maxmemory-policy is {maxmemory_policy}: under memory pressure Redis may evict queued writes \
             or leases; set maxmemory-policy noeviction"
        ));
    }
    if appendonly == "no" {
        warnings.push(
            "Redis appendonly is off: writes accepted since the last snapshot are lost if Redis crashes; \
             set appendonly yes"
                .to_owned(),
        );
    }
    warnings
}

/// The warning when expiry events are off and Redis refused to turn them on.
pub fn expiry_events_refused(why: &str) -> String {
    format!(
        "Redis keyspace expiry events are off and could not be turned on ({why}): a shard whose processor \
         crashed resumes only with the next write to it or a POST /v1/drain; set notify-keyspace-events Ex \
         in the Redis configuration"
    )
}

/// The warning when the configuration cannot be read at all.
pub fn config_unreadable(why: &str) -> String {
    format!(
        "cannot read the Redis configuration ({why}): make sure notify-keyspace-events includes Ex, \
         maxmemory-policy is noeviction and appendonly is yes"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expired events need the keyevent class and the expired type (or all types);
    /// turning them on keeps the flags already set.
    #[test]
    fn expiry_event_flags() {
        assert!(has_expiry_events("Ex") && has_expiry_events("xE") && has_expiry_events("KEA"));
        assert!(!has_expiry_events("") && !has_expiry_events("Kx") && !has_expiry_events("E$"));
        assert_eq!(with_expiry_events("Kg").as_deref(), Some("KgEx"));
        assert_eq!(with_expiry_events("AKE"), None);
    }

    /// Only `noeviction` with AOF on is quiet.
    #[test]
    fn eviction_and_aof_are_reported() {
        assert!(assess("noeviction", "yes").is_empty());
        let w = assess("allkeys-lru", "no");
        assert_eq!(w.len(), 2);
        assert!(w[0].contains("allkeys-lru") && w[1].contains("appendonly"));
    }

    /// Each warning is told by its kind, on a cluster node too; anything
    /// else is a server that could not be read.
    #[test]
    fn warnings_have_kinds() {
        let w = assess("allkeys-lru", "no");
        let kinds: Vec<&str> = [&w[0], &w[1], &expiry_events_refused("ERR"), &config_unreadable("NOPERM")].iter().map(|w| kind(w)).collect();
        assert_eq!(kinds, KINDS[..4]);
        assert_eq!(kind(&format!("on cluster node 10.0.0.2:7001: {}", w[1])), "appendonly_off");
        assert_eq!(kind("Redis (redis_address) is unreachable or failed"), "unreachable");
    }
}
