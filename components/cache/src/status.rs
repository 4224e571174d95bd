//! `GET /v1/writes/{id}`: a write's status, optionally waiting for its outcome.

use spillway_core::layout::WriteId;
use spillway_core::problem::Problem;
use spillway_core::query::Query;
use spillway_core::settings::Settings;
use spillway_spin::{json, status};

/// `GET /v1/writes/{id}[?wait=s]`: the write's status; with `wait`, held until the
/// write leaves `pending` or the time is up (see [`spillway_spin::status`]).
pub(crate) async fn write_status(s: &Settings, raw: &str, query: Option<&str>) -> Result<http::Response<String>, Problem> {
    let query = Query::parse(query, &["wait"])?;
    let wait = match query.get("wait") {
        None => None,
        Some(v) => Some(status::wait_secs(v).ok_or_else(|| bad_wait("/query/wait"))?),
    };
    let Some(id) = WriteId::parse(raw).filter(|id| id.shard < s.layout.shards) else {
        return Err(Problem::not_found(&format!("no write {raw:?}")));
    };
    let body = match wait {
        None => status::status(s, &id).await?,
        Some(ms) => status::wait_for(s, &id, spillway_spin::monotonic_ms() + ms).await?,
    };
    Ok(json(200, &body, &[]))
}

pub(crate) fn bad_wait(field: &str) -> Problem {
    Problem::invalid(&format!("wait must be a number of seconds from 0 to {}", status::MAX_WAIT_SECS), field)
}

