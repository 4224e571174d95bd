//! The Spin side shared by Spillway's components (the pure logic is in
//! `spillway-core`): settings read from Spin variables, one Redis connection kept per
//! instance, Lua script calls with flat replies, and HTTP responses that always carry
//! `Content-Length`.
//!
//! # Layout
//!
//! - [`settings`]: the settings, read from variables once per instance.
//! - [`mod@redis`]: Redis (a kept connection per server, scripts by SHA, flat replies).
//! - [`backend`]: backend failures as answers; credentials masked in what is said.
//! - [`http`]: responses, problems, the admin token, request ids, bodies.
//! - [`ring`]: waking a processor (doorbell channel or HTTP).
//! - [`clock`]: clocks, waiting, random tokens.
//! - [`db`]: the database (SQLite or PostgreSQL), errors checked where Spin reports them.
//! - [`deadline`]: a deadline on every call to a dependency, and on each request.
//! - [`kv`]: the key-value store through `wasi:keyvalue` batch calls.
//! - [`hazards`]: Redis settings Spillway depends on, checked and reported.
//! - [`pipeline`]: the apply step, an imported interface.
//! - [`status`]: write status, and waiting for outcomes without polling.

pub mod backend;
pub mod clock;
pub mod db;
pub mod deadline;
pub mod hazards;
pub mod http;
pub mod kv;
pub mod mirror;
pub mod pipeline;
pub mod redis;
pub mod ring;
pub mod settings;
pub mod status;

pub use backend::{backend_failed, log_ignored, redact};
pub use clock::{monotonic_ms, now_ms, random_u32, token, wait_ms};
pub use http::{answer, authorize, finish, json, method_not_allowed, problem, read_body, request_id, respond};
pub use redis::{Redis, bin, int, text};
pub use ring::{ring, wake};
pub use settings::settings;
