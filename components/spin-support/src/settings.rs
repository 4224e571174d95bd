//! The component's settings, read from its Spin variables once per instance.

use std::cell::RefCell;
use std::rc::Rc;

use spillway_core::problem::Problem;
use spillway_core::settings::Settings;
use spin_sdk::variables;

/// Every variable a component may read; undeclared ones fall back to defaults.
const VARIABLES: &[&str] = &[
    "redis_address", "key_prefix", "shard_count", "batch_size", "round_bytes", "lease_ttl_ms", "max_attempts", "retry_backoff_ms",
    "queue_depth_limit", "scheduled_limit", "schedule_horizon_secs", "idempotency_ttl_secs", "admin_token", "max_body_bytes", "max_batch",
    "max_key_len", "max_value_bytes", "max_json_depth", "status_retention_secs", "change_feed_secs", "stats_public", "database", "wake_url", "drain_budget_secs", "shard_redis_addresses", "redis_cluster", "call_timeout_ms", "request_timeout_ms", "min_replicas", "replica_timeout_ms", "node_name", "cache_store", "alarm_db",
    "tenant_from", "tenant_rate", "tenant_burst", "tenant_depth", "tenant_overrides",
];

thread_local! {
    static SETTINGS: RefCell<Option<Rc<Settings>>> = const { RefCell::new(None) };
}

/// Reads [`Settings`] from the component's Spin variables, once per instance: a
/// reused WASIp3 instance serves up to 128 requests, and reading every variable
/// on each one would be a host call per variable on the hot path. Shared, not copied, by the
/// instance's requests.
pub async fn settings() -> Result<Rc<Settings>, Problem> {
    if let Some(s) = SETTINGS.with_borrow(Clone::clone) {
        return Ok(s);
    }
    let s = Rc::new(load_settings().await?);
    SETTINGS.with_borrow_mut(|c| *c = Some(s.clone()));
    Ok(s)
}

async fn load_settings() -> Result<Settings, Problem> {
    let mut values = std::collections::HashMap::new();
    for name in VARIABLES {
        if let Ok(v) = variables::get(*name).await {
            values.insert(*name, v);
        }
    }
    Settings::load(|n| values.get(n).cloned())
        .map_err(|e| Problem::new(500, "misconfigured", "Misconfigured", &e.to_string()))
}


/// Runs `f` with the instance's settings if they have been read (a failure
/// path must not read variables: it may be the variables that fail).
pub(crate) fn with_loaded<R>(f: impl FnOnce(Option<&Settings>) -> R) -> R {
    SETTINGS.with_borrow(|s| f(s.as_deref()))
}
