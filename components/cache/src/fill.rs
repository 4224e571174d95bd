//! Cache-aside: a hit from the key-value store, or a miss filled from the
//! database under the key's single-flight lock; hits and misses counted.

use spillway_core::layout::{ABSENT_TTL_MS, FILL_LOCK_TTL_MS};
use spillway_core::call::Call;
use spillway_core::problem::Problem;
use spillway_core::record::RecordDoc;
use spillway_core::reply::FillBegin;
use spillway_core::settings::Settings;
use spillway_spin::kv::CacheStore;
use spillway_spin::{Redis, token};

use crate::entry::{Entry, from_db};

/// The record through the cache: a hit, or a miss filled from the database.
/// A cache store that fails or runs out of time is gone around: the record
/// comes from the database and the cache is left alone.
pub(crate) async fn cached_or_filled(s: &Settings, key: &str) -> Result<Option<Entry>, Problem> {
    let looked = async {
        let store = CacheStore::kept(s).await?;
        let found = store.get(s, key).await?;
        Ok::<_, Problem>((store, found))
    };
    let store = match looked.await {
        Ok((store, found)) => {
            if let Some(entry) = found.and_then(Entry::parse) {
                count_read(s, true).await;
                return Ok(Some(entry));
            }
            store
        }
        Err(p) => return around_cache(key, &p).await,
    };
    count_read(s, false).await;
    Ok(fill(s, &store, key).await?.as_ref().map(Entry::from_doc))
}

/// The record from the database, the cache store having failed (`why`).
/// Read-your-writes holds: the database has every applied write.
async fn around_cache(key: &str, why: &Problem) -> Result<Option<Entry>, Problem> {
    log_bypassed(why);
    Ok(from_db(key).await?.as_ref().map(Entry::from_doc))
}

/// One JSON line: a read answered from the database because the cache (its
/// store, or its fill lock's Redis) failed with `why`.
pub(crate) fn log_bypassed(why: &Problem) {
    eprintln!("{}", serde_json::json!({"event": "cache_bypassed", "error": why.detail}));
}

thread_local! {
    /// This instance's cache hits and misses not yet added to Redis, and when they
    /// last were (monotonic ms; none yet).
    static READS: std::cell::Cell<(u64, u64, Option<u64>)> = const { std::cell::Cell::new((0, 0, None)) };
}

/// Counts a read for the stats (a miss includes a key known to be absent). The
/// counts go to Redis with an instance's first read and then at most once a
/// second, from a task of their own, so no read waits for it; they are
/// approximate: an instance that retires takes up to its last second of counts.
async fn count_read(s: &Settings, hit: bool) {
    let (mut hits, mut misses, last) = READS.get();
    if hit {
        hits += 1;
    } else {
        misses += 1;
    }
    let now = spillway_spin::monotonic_ms();
    if last.is_some_and(|last| now < last + 1000) {
        READS.set((hits, misses, last));
        return;
    }
    READS.set((0, 0, Some(now)));
    let (address, layout) = (s.redis_for(0).to_owned(), s.layout.clone());
    spin_sdk::wasip3::spawn(async move {
        let counted = Redis::new(&address).call(&Call::cache_count(&layout, hits, misses)).await;
        if counted.is_err() {
            // Kept for the next flush.
            let (h, m, t) = READS.get();
            READS.set((h + hits, m + misses, t));
        }
    });
}

/// Cache miss: one filler per key reads the database and fills the cache under the
/// single-flight lock (the same lock the processor takes to refresh, so an older
/// value cannot overwrite a newer one); others wait for it, then fall back to the
/// database without filling, as they do when the lock cannot be had (Redis
/// failing or stalled). A key found absent is remembered for a while (the
/// negative entry, see `scripts::FILL_BEGIN`), until it is created.
async fn fill(s: &Settings, store: &CacheStore, key: &str) -> Result<Option<RecordDoc>, Problem> {
    let redis = Redis::for_shard(s, s.layout.shard_of(key));
    let l = &s.layout;
    let lock = l.fill_lock(key);
    let me = token();
    // Wait up to a second for another filler (it normally takes milliseconds),
    // then read the database without filling.
    let give_up = spillway_spin::monotonic_ms() + 1000;
    while spillway_spin::monotonic_ms() < give_up {
        // Without the lock (Redis failing or stalled), the database answers and
        // the cache is left alone.
        let begun = async { FillBegin::parse(&spillway_spin::redis::values(&redis.call(&Call::fill_begin(l, key, &me, FILL_LOCK_TTL_MS)).await?)).map_err(spillway_spin::redis::malformed) };
        let begun = match begun.await {
            Ok(b) => b,
            Err(p) => {
                log_bypassed(&p);
                break;
            }
        };
        match begun {
            FillBegin::Absent => return Ok(None),
            FillBegin::Mine => {
                let entry = match from_db(key).await {
                    Ok(e) => e,
                    Err(p) => {
                        spillway_spin::log_ignored("releasing a fill lock", redis.call(&Call::unlock(vec![lock], &me)).await);
                        return Err(p);
                    }
                };
                let Some(e) = entry else {
                    spillway_spin::log_ignored("remembering an absent key", redis.call(&Call::fill_absent(l, key, &me, ABSENT_TTL_MS)).await);
                    return Ok(None);
                };
                // A fill the store refuses or does not take in time leaves the
                // cache as it was; the reader has its record all the same. Its
                // lock is then kept until it expires: the store may still carry
                // the abandoned write out, and no newer value may go in first.
                match store.set(s, key, e.to_text().as_bytes()).await {
                    Ok(()) => spillway_spin::log_ignored("releasing a fill lock", redis.call(&Call::unlock(vec![lock], &me)).await),
                    Err(p) => spillway_spin::log_ignored("filling the cache", Err::<(), _>(p)),
                }
                return Ok(Some(e));
            }
            FillBegin::Busy => {}
        }
        spillway_spin::wait_ms(2).await;
        match store.get(s, key).await {
            Ok(found) => {
                if let Some(e) = found.and_then(|b| serde_json::from_slice(&b).ok()) {
                    return Ok(Some(e));
                }
            }
            Err(_) => break,
        }
    }
    from_db(key).await
}

