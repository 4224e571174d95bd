//! `PUT` / `DELETE /v1/cache/{key}` (admin): refresh or drop a cache entry,
//! under the key's fill lock like every cache write.

use spillway_core::layout::{FILL_LOCK_TTL_MS, decode_key};
use spillway_core::call::Call;
use spillway_core::problem::Problem;
use spillway_core::reply::Grant;
use spillway_core::settings::Settings;
use spillway_spin::kv::CacheStore;
use spillway_spin::{Redis, respond, token};

use crate::entry::from_db;

/// `PUT /v1/cache/{key}` refreshes the entry from the database; `DELETE` drops it.
/// Both under the key's fill lock, like every cache write.
pub(crate) async fn cache_admin(s: &Settings, raw_key: &str, delete: bool) -> Result<http::Response<String>, Problem> {
    let key = decode_key(raw_key).ok_or_else(|| Problem::invalid("the key is not valid percent-encoded UTF-8", "/path/key"))?;
    if key.is_empty() || key.chars().count() > s.limits.max_key_len {
        return Err(Problem::invalid(&format!("the key must be 1 to {} characters", s.limits.max_key_len), "/path/key"));
    }
    let store = CacheStore::kept(s).await?;
    let redis = Redis::for_shard(s, s.layout.shard_of(&key));
    let lock = s.layout.fill_lock(&key);
    let me = token();
    for _ in 0..500 {
        let got = redis.call(&Call::lock(&s.layout, &key, &me, FILL_LOCK_TTL_MS)).await?;
        let grants = Grant::parse_all(&spillway_spin::redis::values(&got), 1).map_err(spillway_spin::redis::malformed)?;
        if grants == [Grant::Taken] {
            let result = async {
                if delete {
                    store.delete(s, &key).await?;
                    return Ok(respond(204, "application/json", String::new(), &[]));
                }
                let Some(entry) = from_db(&key).await? else {
                    store.delete(s, &key).await?;
                    return Err(Problem::not_found(&format!("no record {key:?}")));
                };
                store.set(s, &key, entry.to_text().as_bytes()).await?;
                Ok(respond(200, "application/json", entry.to_text(), &[]))
            }
            .await;
            redis.call(&Call::unlock(vec![lock], &me)).await?;
            return result;
        }
        spillway_spin::wait_ms(2).await;
    }
    Err(Problem::unavailable("the record's cache lock stayed busy"))
}
