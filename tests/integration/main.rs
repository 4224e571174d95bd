//! Integration tests of the embedded Spin host: real guest components (built for
//! wasm32-wasip2 from `tests/fixtures/`) against a real `redis-server` and real
//! SQLite files, each test with its own server and directory.

/// Test support: redis-server, fixtures, temporary apps.
mod support;
/// A real PostgreSQL server, a database per test.
mod pg;
/// Support for Spillway's own app: the repository's spin.toml in process.
mod spillway;
/// Support for Spillway as separate processes (crash tests).
mod processes;
/// A network namespace per process, cut and healed with nftables.
mod netns;
/// A proxy in front of PostgreSQL that makes commits ambiguous.
mod commit_cutter;

/// The `up` command as a separate process: route listing, serving TCP, startup errors.
mod cli;
/// The HTTP API: errors, limits, backpressure, auth, key safety, OpenAPI.
mod api;
/// The apply step as a component (`spillway:pipeline/apply`): the built-in operations.
mod apply_component;
/// A real three-master Redis Cluster from one seed node: routing, resharding.
mod cluster;
/// Crash safety: processors SIGKILLed mid-run lose and double nothing.
mod crash;
/// Deadlines: stalled or dead Redis, database and key-value store.
mod deadlines;
/// Deployment manifests: SpinKube's SpinApp wires every variable, holds no secret.
mod deploy;
/// The apply step replaced through the manifest: the Rust and Python examples,
/// and a faulty implementation's keys isolated.
mod examples;
/// The fault suite: a history of a unique-write workload under faults, and a
/// checker (lost, duplicated, unexpected, out of order, stale, recovery).
mod faults;
/// Network partitions: a processor cut off from Redis or the database.
mod partitions;
/// Several Spillway nodes sharing a Redis Cluster and PostgreSQL.
mod nodes;
/// Fencing: an expired lease holder cannot commit.
mod fencing;
/// The HTTP-only deployment: wake-ups over service chaining, drains within a budget.
mod http_only;
/// The emulated hosted platform: a burst and large values within its limits.
mod hosted;
/// HTTP trigger: routing, `spin-*` headers, 404, instance reuse and isolation.
mod http;
/// `spin:key-value`: the default SQLite store, Redis per runtime config, refusals.
mod key_value;
/// Spillway's pipeline: intake -> queue -> locked apply -> cached read.
mod pipeline;
/// Scheduled writes: applied when due with no traffic, in order, cancellable,
/// bounded.
mod schedule;
/// Tenants: quotas on rate and depth, checked where writes are enqueued;
/// fairness under one tenant's flood.
mod tenants;
/// Self-healing: lost wake-ups and crashed processors recover with no traffic;
/// fresh start; bounded state; Redis hazards reported.
mod selfheal;
/// Replica acknowledgement: min_replicas, and a failover that loses no 202.
mod replicas;
/// Reads users can trust: read-your-writes on both cache backends, waiting for
/// outcomes, consistent and conditional reads.
mod reads;
/// Many records at once, negative caching, change feeds (SSE).
mod feeds;
/// Stats, metrics, dead-letter purge, JSON log lines.
mod ops;
/// A real Prometheus scraping, the shipped alert rules and Grafana dashboard.
mod prometheus;
/// Credentials: passwords work, and show in no answer or log line.
mod secrets;
/// `spin:redis`: commands, reply flattening, `allowed_outbound_hosts`.
mod redis_outbound;
/// The Redis trigger: delivery in order, failures do not stop it.
mod redis_trigger;
/// `spin:sqlite`: statements, value mapping, errors, refusals.
mod sqlite;
/// `spin:variables`: resolution, overrides, templates, errors.
mod variables;
/// One source for the variables: the documented table, the manifest, the code.
mod variables_table;
/// WASI: environment, clocks, random, guest output.
mod wasi;
