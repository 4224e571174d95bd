//! `GET /v1/writes/{id}`: a write's status, optionally waiting for its outcome.

use serde_json::json;
use spillway_core::call::Call;
use spillway_core::layout::WriteId;
use spillway_core::problem::Problem;
use spillway_core::query::Query;
use spillway_core::settings::Settings;
use spillway_spin::{Redis, int, json, status};

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

/// `DELETE /v1/writes/{id}`: cancels a scheduled write not yet due (nor
/// moved into its shard's stream): `200` with status `cancelled` (again for a
/// write cancelled before); `409` once it is queued or has an outcome; `404`
/// for no such write.
pub(crate) async fn cancel(s: &Settings, raw: &str) -> Result<http::Response<String>, Problem> {
    let Some(id) = WriteId::parse(raw).filter(|id| id.shard < s.layout.shards) else {
        return Err(Problem::not_found(&format!("no write {raw:?}")));
    };
    let retention_ms = s.status_retention_secs.saturating_mul(1000);
    if let Some(call) = Call::cancel(&s.layout, id.shard, s.idempotency_shard(id.shard), &id.entry, retention_ms) {
        let reply = Redis::for_shard(s, id.shard).call(&call).await?;
        if reply.first().and_then(int) == Some(1) {
            return Ok(json(200, &json!({"id": id.to_string(), "status": "cancelled"}), &[]));
        }
    }
    let now = status::status(s, &id).await?;
    if now["status"] == "cancelled" {
        return Ok(json(200, &now, &[]));
    }
    let is = now["status"].as_str().unwrap_or("unknown");
    Err(Problem::new(409, "too-late", "Too late to cancel", &format!("write {id} is {is}: only a scheduled write can be cancelled, before it is due")))
}

pub(crate) fn bad_wait(field: &str) -> Problem {
    Problem::invalid(&format!("wait must be a number of seconds from 0 to {}", status::MAX_WAIT_SECS), field)
}

