//! Spillway cache (HTTP): the read path.
//!
//! `GET /v1/records/{key}` reads the key-value store `default` first and the database
//! on a miss, filling the cache under a single-flight lock so a hot miss reaches the
//! database once; the ETag is the MD5 of the value and `If-None-Match` answers 304.
//! `GET /v1/writes/{id}` tells a write's status: pending, applied, rejected or dead.
//! `POST /v1/records:get` reads many records at once; `GET /v1/records/{key}/changes`
//! streams a key's versions as Server-Sent Events.

mod admin;
mod changes;
mod entry;
mod fill;
mod read;
mod records;
mod routes;
mod status;

use spin_sdk::http::{IntoResponse, Request};
use spin_sdk::http_service;

#[http_service]
async fn handle(req: Request) -> impl IntoResponse {
    let id = spillway_spin::request_id(req.headers());
    spillway_spin::finish(routes::handle(req).await, &id).await
}
