//! Spillway processor: applies queued writes.
//!
//! Triggered by the doorbell (Redis trigger; the message is a shard number), by
//! Redis's expired-key events (an expired shard lease or doorbell flag: a processor
//! died; the shard is resumed with no further traffic) and by `POST /v1/drain`
//! (admin token; for platforms without the Redis trigger, called by cron). Either way it takes the shard's lease, reads batches through the consumer
//! group, applies each in ONE database transaction (fenced, ordered, deduplicated by
//! write id), refreshes the cache, acknowledges, and releases the lease.

// spin-sdk's `#[redis_subscriber]` expands to the export glue, which is `unsafe`.
#![allow(unsafe_code)]

mod db;
mod dead;
mod drain;
mod handlers;
mod lease;
mod ops;

use bytes::Bytes;
use spin_sdk::http::{IntoResponse, Request};
use spin_sdk::{http_service, redis_subscriber};

#[http_service]
async fn handle(req: Request) -> impl IntoResponse {
    let id = spillway_spin::request_id(req.headers());
    spillway_spin::finish(handlers::handle(req).await, &id).await
}

/// Both Redis-trigger channels: the doorbell and Redis's expired-key events.
#[redis_subscriber]
async fn on_message(message: Bytes) -> anyhow::Result<()> {
    handlers::on_message(&message).await
}
