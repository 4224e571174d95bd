//! Spillway intake (HTTP): `POST /v1/writes`.
//!
//! A request (one write, or `{"writes": [...]}`) is validated in full, then made
//! durable with ONE Redis round trip (the enqueue script: idempotency check, depth
//! check, `XADD` per write, coalesced doorbell), and answered `202 Accepted` with the
//! write ids and status URLs. A refused request enqueues nothing.

mod answered;
mod handlers;
mod throttle;

use spin_sdk::http::{IntoResponse, Request};
use spin_sdk::http_service;

#[http_service]
async fn handle(req: Request) -> impl IntoResponse {
    let id = spillway_spin::request_id(req.headers());
    spillway_spin::finish(handlers::handle(req).await, &id).await
}
