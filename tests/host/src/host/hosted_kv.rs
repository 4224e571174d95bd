//! The key-value store of the emulated hosted platform (`up --emulate
//! akamai-functions`, see [`crate::app::Hosted`]): in memory, shared by the
//! app's components, with the two published properties that matter to a
//! cache (Akamai Functions' "Quotas and limits" and "Use the Key Value store"
//! pages):
//!
//! - **Writes per app per second** (50): every key written or deleted counts
//!   (a `set-many` of n keys counts n), against a budget refilled at that rate
//!   and holding at most one second's worth. The pages give the figure, not
//!   what happens beyond it; this store refuses the write (`other`, "rate
//!   limit exceeded") and writes nothing of it, the stricter of the two
//!   readings (the other: held back until the budget allows).
//! - **Read-your-writes only within one request**: the store is globally
//!   replicated. A write is seen at once by the request (the instance: the
//!   profile gives every request its own) that made it, and by every other
//!   only after the replication delay; until then they see the value before.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::spin::key_value::key_value::Error;

/// One version of a key: when and by whom it was written; `None` deleted.
struct Version {
    at: Instant,
    by: u64,
    value: Option<Vec<u8>>,
}

/// The store (see the module's docs).
pub(crate) struct HostedKv {
    writes_per_sec: f64,
    delay: Duration,
    /// The write budget: what is left, and when it was last refilled.
    budget: Mutex<(f64, Instant)>,
    /// Each key's versions, oldest first: the newest one every request sees,
    /// and those still replicating.
    keys: Mutex<HashMap<String, Vec<Version>>>,
}

impl HostedKv {
    pub(crate) fn new(writes_per_sec: u32, delay: Duration) -> Self {
        let rate = f64::from(writes_per_sec.max(1));
        Self { writes_per_sec: rate, delay, budget: Mutex::new((rate, Instant::now())), keys: Mutex::new(HashMap::new()) }
    }

    /// Takes `n` writes from the budget, or refuses them all.
    fn spend(&self, n: usize) -> Result<(), Error> {
        let mut b = self.budget.lock().map_err(|_| Error::Other("poisoned".into()))?;
        let now = Instant::now();
        b.0 = (b.0 + now.duration_since(b.1).as_secs_f64() * self.writes_per_sec).min(self.writes_per_sec);
        b.1 = now;
        if b.0 < n as f64 {
            return Err(Error::Other(format!(
                "rate limit exceeded: the key-value store takes {} writes per second per app ({n} asked, {:.0} left this second)",
                self.writes_per_sec, b.0
            )));
        }
        b.0 -= n as f64;
        Ok(())
    }

    /// Writes (`Some`) or deletes (`None`) each key, as request `by`.
    pub(crate) fn write(&self, by: u64, pairs: Vec<(String, Option<Vec<u8>>)>) -> Result<(), Error> {
        self.spend(pairs.len())?;
        let now = Instant::now();
        let mut keys = self.keys.lock().map_err(|_| Error::Other("poisoned".into()))?;
        for (key, value) in pairs {
            let versions = keys.entry(key).or_default();
            versions.push(Version { at: now, by, value });
            // What no one can see any more: everything before the newest
            // version every request sees.
            let settled = versions.iter().rposition(|v| v.at + self.delay <= now).unwrap_or(0);
            versions.drain(..settled);
        }
        Ok(())
    }

    /// The value request `by` sees at `key`: its own newest write, or the
    /// newest write that has replicated, whichever is newer.
    pub(crate) fn read(&self, by: u64, key: &str) -> Result<Option<Vec<u8>>, Error> {
        let now = Instant::now();
        let keys = self.keys.lock().map_err(|_| Error::Other("poisoned".into()))?;
        Ok(keys.get(key).and_then(|versions| versions.iter().rev().find(|v| v.by == by || v.at + self.delay <= now)).and_then(|v| v.value.clone()))
    }

    /// The keys request `by` sees.
    pub(crate) fn keys(&self, by: u64) -> Result<Vec<String>, Error> {
        let names: Vec<String> = self.keys.lock().map_err(|_| Error::Other("poisoned".into()))?.keys().cloned().collect();
        let mut out = Vec::new();
        for k in names {
            if self.read(by, &k)?.is_some() {
                out.push(k);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Another request sees a write only after the delay; the writer at once.
    #[test]
    fn another_request_sees_a_write_late() {
        let kv = HostedKv::new(50, Duration::from_millis(200));
        kv.write(1, vec![("k".into(), Some(b"v1".to_vec()))]).unwrap();
        std::thread::sleep(Duration::from_millis(250));
        kv.write(1, vec![("k".into(), Some(b"v2".to_vec()))]).unwrap();
        assert_eq!(kv.read(1, "k").unwrap(), Some(b"v2".to_vec()), "read-your-writes within the request");
        assert_eq!(kv.read(2, "k").unwrap(), Some(b"v1".to_vec()), "another request: the replicated value");
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(kv.read(2, "k").unwrap(), Some(b"v2".to_vec()), "after the delay");
        kv.write(2, vec![("k".into(), None)]).unwrap();
        assert_eq!(kv.read(2, "k").unwrap(), None);
        assert_eq!(kv.read(3, "k").unwrap(), Some(b"v2".to_vec()));
    }

    /// Beyond the rate, writes are refused whole; the budget refills.
    #[test]
    fn writes_beyond_the_rate_are_refused() {
        let kv = HostedKv::new(50, Duration::ZERO);
        let many = |n: usize| (0..n).map(|i| (format!("k{i}"), Some(vec![1]))).collect::<Vec<_>>();
        kv.write(1, many(40)).unwrap();
        let refused = kv.write(1, many(20)).unwrap_err();
        assert!(matches!(&refused, Error::Other(m) if m.contains("rate limit exceeded")), "{refused:?}");
        assert_eq!(kv.read(1, "k19").unwrap(), Some(vec![1]), "from the first write");
        std::thread::sleep(Duration::from_millis(300));
        kv.write(1, many(20)).unwrap();
    }
}
