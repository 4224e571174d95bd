//! An embedded, Spin-compatible host for testing Spillway's components.
//!
//! Spin cannot be installed here, so this crate runs the same built `.wasm` components
//! the way Spin >= 4.1 does, against real Redis and SQLite: it reads `spin.toml`,
//! resolves variables, serves HTTP routes and subscribes Redis triggers, and provides
//! the Spin host interfaces. Where a component can observe Spin's behaviour (error
//! variants, headers, variable resolution, per-invocation isolation, instance reuse)
//! this host follows it.
//!
//! # Layout
//!
//! - [`manifest`]: `spin.toml` (version 2) types and validation.
//! - [`template`]: `{{ name }}` templates over application variables.
//! - [`runtime_config`]: the `--runtime-config-file` format.
//! - [`outbound`]: `allowed_outbound_hosts` parsing and matching.
//! - [`engine`]: the process-wide wasmtime engine and compiled-component cache.
//! - [`compose`]: component dependencies, composed and denied as Spin does.
//! - `app`: loading an application ([`App`], [`AppOptions`]).
//! - `state`: per-store data (WASI, WASI HTTP, Spin capabilities, guest output).
//! - `host`: `spin:redis`, `spin:key-value`, `spin:sqlite`, `spin:variables`.
//! - `http`: routing, `spin-*` headers, instance reuse, the HTTP server.
//! - `redis_trigger`: the Redis trigger.
//! - [`up`]: the `up` command (`spin up` for this host).

mod app;
pub mod compose;
pub mod engine;
mod host;
mod http;
pub mod manifest;
pub mod outbound;
mod redis_trigger;
pub mod runtime_config;
mod state;
pub mod template;
pub mod up;

pub use app::{App, AppOptions, Hosted, InstanceReuse, Peak};
pub use http::FullResponse;
pub use state::StoreData;
