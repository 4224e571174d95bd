//! Entry points: the doorbell message and `POST /v1/drain`.

use serde_json::json;
use spillway_core::problem::Problem;
use spillway_spin::{authorize, json, problem};
use spin_sdk::http::Request;

use crate::drain::{Stats, drain_shard};

pub(crate) async fn on_doorbell(message: &[u8]) -> anyhow::Result<()> {
    let settings = spillway_spin::settings().await.map_err(|p| anyhow::anyhow!(p.detail))?;
    let shard: u32 = std::str::from_utf8(message)?.trim().parse()?;
    anyhow::ensure!(shard < settings.layout.shards, "doorbell for shard {shard}, but there are {}", settings.layout.shards);
    let mut stats = Stats::default();
    drain_shard(&settings, shard, &mut stats).await.map_err(|p| anyhow::anyhow!("shard {shard}: {}", p.detail))
}

pub(crate) async fn handle(req: Request) -> http::Response<String> {
    if req.method() != http::Method::POST {
        return spillway_spin::method_not_allowed("POST");
    }
    let settings = match spillway_spin::settings().await {
        Ok(s) => s,
        Err(p) => return problem(&p),
    };
    if let Err(p) = authorize(req.headers(), settings.admin_token.as_deref()) {
        return problem(&p);
    }
    let only: Option<u32> = match req.uri().query().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("shard="))) {
        None => None,
        Some(s) => match s.parse() {
            Ok(n) if n < settings.layout.shards => Some(n),
            _ => return problem(&Problem::invalid(&format!("shard must be a number below {}", settings.layout.shards), "/query/shard").at("/query/shard")),
        },
    };
    let mut stats = Stats::default();
    let shards: Vec<u32> = match only {
        Some(s) => vec![s],
        None => (0..settings.layout.shards).collect(),
    };
    let mut errors = Vec::new();
    for shard in shards {
        if let Err(p) = drain_shard(&settings, shard, &mut stats).await {
            errors.push(json!({"shard": shard, "detail": p.detail}));
        }
    }
    json(200, &json!({
        "applied": stats.applied,
        "rejected": stats.rejected,
        "batches": stats.batches,
        "busy_shards": stats.busy,
        "errors": errors,
    }), &[])
}
