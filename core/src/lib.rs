//! Spillway's pure logic, shared by the components and tested natively.
//!
//! # Layout
//!
//! - [`write`]: the write model (`put`, `merge`, `incr`, `append`, `delete`, or the
//!   operations an apply step declares) and its validation against configured
//!   [`write::Limits`].
//! - [`apply`]: applying writes to records: the built-in operations (RFC 7396 merge
//!   patch, bounded increments, preconditions) as an apply step, ETags;
//!   [`apply::plan_with`] for a whole ordered batch through any apply step.
//! - [`cluster`]: Redis Cluster as a client without redirects sees it: key slots,
//!   the slot map (`CLUSTER NODES`), `MOVED`/`ASK`/`TRYAGAIN`, nodes' URLs.
//! - [`dead`]: dead-letter entries, and which ones a request selects.
//! - [`exposition`]: the Prometheus text format `/metrics` is served in.
//! - [`hazards`]: the Redis settings Spillway depends on, and what to do about each.
//! - [`layout`]: the Redis key layout (prefix, shard hash tags) and write ids.
//! - [`call`]: the processor's protocol scripts as typed calls.
//! - [`scripts`]: the Lua scripts (enqueue, lease, read batch, ack) and their replies.
//! - [`sql`]: the database schema and statements, fencing included.
//! - [`record`]: a record on the wire: the database row and the document.
//! - [`query`]: query strings, decoded and checked.
//! - [`reply`]: the scripts' replies, typed.
//! - [`redact`]: credentials kept out of answers and log lines.
//! - [`problem`]: RFC 9457 problem details, the one error shape of the HTTP API.
//! - [`settings`]: configuration read from Spin variables, with defaults.
//! - [`tenant`]: tenants, named by a header or key prefix, and their quotas.

pub mod apply;
pub mod call;
pub mod cluster;
pub mod dead;
pub mod exposition;
pub mod hazards;
pub mod layout;
pub mod lease;
pub mod problem;
pub mod query;
pub mod record;
pub mod redact;
pub mod reply;
pub mod schedule;
pub mod scripts;
pub mod settings;
pub mod sql;
pub mod tenant;
pub mod write;
