//! Waking a processor: the doorbell channel, or an HTTP wake where there is no
//! Redis trigger.

use spillway_core::settings::Settings;

use crate::redis::{Redis, bin};

/// Rings the doorbell of `shards`: over HTTP where a wake URL is set (no Redis
/// trigger; one wake is enough, as the woken drain also claims every other shard
/// with queued writes and no holder), else on the doorbell channel, on
/// `redis_address` (where the processor's Redis trigger listens, whichever
/// server holds the shards). Best effort, as [`wake`].
pub async fn ring(s: &Settings, shards: &[u32]) {
    if s.wake_url.is_some() {
        if let Some(first) = shards.first() {
            wake(s, *first).await;
        }
        return;
    }
    let redis = Redis::new(&s.redis_address);
    for shard in shards {
        if let Err(p) = redis.execute("PUBLISH", vec![bin(&s.layout.doorbell_channel()), bin(&shard.to_string())]).await {
            eprintln!("doorbell: {}", p.detail);
        }
    }
}

/// Wakes a processor for `shard` where there is no Redis trigger: `POST
/// <wake_url>?shard=n` (service chaining on one app). The processor answers at
/// once and drains after answering. Best effort: a wake that fails leaves the
/// shard's doorbell flag set, and the next write after half its TTL rings again
/// (see `scripts::ENQUEUE`); a cron on the same endpoint is the safety net.
pub async fn wake(s: &Settings, shard: u32) {
    let Some(url) = &s.wake_url else { return };
    let ms = crate::deadline::call_timeout_ms();
    match crate::deadline::within(ms, spin_sdk::http::post(format!("{url}?shard={shard}"), "")).await {
        Some(Ok(r)) if r.status().is_success() => {}
        Some(Ok(r)) => eprintln!("{}", crate::backend::redact(&format!("wake {url}: status {}", r.status()))),
        Some(Err(e)) => eprintln!("{}", crate::backend::redact(&format!("wake {url}: {e}"))),
        None => eprintln!("{}", crate::backend::redact(&format!("wake {url}: no answer within {ms} ms (call_timeout_ms)"))),
    }
}

