//! Tenants and their quotas: who a write is charged to, and how much each
//! tenant may send (a token bucket of writes per second) and keep waiting
//! (queue depth).
//!
//! A tenant is named by the `Spillway-Tenant` header, or by the part of each
//! record key before a separator (`tenant_from`). Writes with no tenant are
//! charged to no one. Quotas are checked in the enqueue script itself (see
//! `scripts::ENQUEUE`), against state kept beside the request's idempotency
//! record: one set per Redis server, or per shard with `redis_cluster`, each
//! enforcing the share of the quota that its shards are of all shards.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::problem::Problem;

/// The request header that names the tenant (with `tenant_from = header`).
pub const HEADER: &str = "spillway-tenant";

/// The longest tenant name.
pub const MAX_NAME: usize = 64;

/// What a tenant name must be, as error messages say it.
pub const NAME_RULE: &str = "1 to 64 of the characters A-Z a-z 0-9 . _ -";

/// Whether `name` may name a tenant: 1 to [`MAX_NAME`] letters, digits, `.`,
/// `_` or `-` (so it never holds a `{` or a `:`, which the scripts' keys and
/// stored writes rely on).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// What a tenant may do. Zero is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// Writes accepted per second, on average (the bucket's refill rate).
    #[serde(default)]
    pub rate: u64,
    /// Writes accepted at once after a quiet spell (the bucket's size; unset:
    /// one second's worth of `rate`).
    #[serde(default)]
    pub burst: u64,
    /// Writes accepted and not yet settled (applied, rejected, dead-lettered
    /// or cancelled), scheduled ones and pending expiries included.
    #[serde(default)]
    pub depth: u64,
}

impl Quota {
    /// Whether it limits anything.
    pub fn limits(&self) -> bool {
        self.rate > 0 || self.depth > 0
    }

    /// The share of this quota that state covering `of` of all `shards` shards
    /// enforces: rounded up, so that a limit never becomes 0 (no limit).
    pub fn share(self, of: u32, shards: u32) -> Self {
        let part = |v: u64| if v == 0 || of >= shards { v } else { v.saturating_mul(u64::from(of)).div_ceil(u64::from(shards.max(1))).max(1) };
        Self { rate: part(self.rate), burst: part(self.burst), depth: part(self.depth) }
    }
}

/// Where a write's tenant comes from (`tenant_from`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The `Spillway-Tenant` header, for the whole request.
    Header,
    /// Each key's part before this separator (a key without it has no tenant).
    KeyPrefix(String),
}

/// The tenant settings: where tenants come from, and their quotas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenancy {
    /// `tenant_from`.
    pub source: Source,
    /// `tenant_rate`, `tenant_burst`, `tenant_depth`: every tenant's quota
    /// unless overridden.
    pub default: Quota,
    /// `tenant_overrides`: quotas of named tenants (members left out take the
    /// default's).
    pub overrides: BTreeMap<String, Quota>,
}

impl Default for Tenancy {
    fn default() -> Self {
        Self { source: Source::Header, default: Quota::default(), overrides: BTreeMap::new() }
    }
}

impl Tenancy {
    /// Reads `tenant_from` (`header`, or `key:<separator>`) and the overrides
    /// (a JSON object of tenant name to `{"rate", "burst", "depth"}`); the
    /// error names what is wrong, for the variable's error.
    pub fn parse(from: &str, default: Quota, overrides: &str) -> Result<Self, (&'static str, String)> {
        let source = match from.trim() {
            "" | "header" => Source::Header,
            other => match other.strip_prefix("key:") {
                Some(sep) if !sep.is_empty() => Source::KeyPrefix(sep.to_owned()),
                _ => return Err(("tenant_from", format!("{other:?} is not header or key:<separator>"))),
            },
        };
        let default = with_burst(default);
        let overrides = if overrides.trim().is_empty() {
            BTreeMap::new()
        } else {
            let raw: BTreeMap<String, serde_json::Value> =
                serde_json::from_str(overrides).map_err(|e| ("tenant_overrides", format!("not a JSON object of tenant quotas: {e}")))?;
            let mut out = BTreeMap::new();
            for (name, v) in raw {
                if !valid_name(&name) {
                    return Err(("tenant_overrides", format!("{name:?} is not a tenant name ({NAME_RULE})")));
                }
                let mut q: serde_json::Map<String, serde_json::Value> = match v {
                    serde_json::Value::Object(o) => o,
                    _ => return Err(("tenant_overrides", format!("{name}: not an object of rate, burst, depth"))),
                };
                // Members left out take the default's; a burst left out
                // follows the tenant's own rate if it sets one.
                if !q.contains_key("burst") && !q.contains_key("rate") {
                    q.insert("burst".into(), default.burst.into());
                }
                for (member, value) in [("rate", default.rate), ("depth", default.depth)] {
                    q.entry(member).or_insert(value.into());
                }
                let quota: Quota = serde_json::from_value(q.into()).map_err(|e| ("tenant_overrides", format!("{name}: {e}")))?;
                out.insert(name, with_burst(quota));
            }
            out
        };
        Ok(Self { source, default, overrides })
    }

    /// `name`'s quota.
    pub fn quota(&self, name: &str) -> Quota {
        self.overrides.get(name).copied().unwrap_or(self.default)
    }

    /// The tenant `key` names (with `tenant_from = key:<separator>`): its
    /// part before the separator, or none.
    pub fn of_key<'k>(&self, key: &'k str) -> Option<&'k str> {
        match &self.source {
            Source::Header => None,
            Source::KeyPrefix(sep) => key.split_once(sep.as_str()).map(|(t, _)| t),
        }
    }
}

/// A burst left unset is one second's worth of the rate (at least 1).
fn with_burst(q: Quota) -> Quota {
    Quota { burst: if q.burst == 0 && q.rate > 0 { q.rate } else { q.burst }, ..q }
}

/// The refusals a caller remembers, to refuse a tenant again without asking
/// Redis while a refusal is sure to hold (see the intake's `throttle`), and
/// the requests so refused, to count with the tenant's next enqueue.
///
/// A rate refusal is sure to hold for a request of `n` writes while the
/// bucket, as the script found it and refilled at the tenant's rate since,
/// has fewer than `n` tokens (other callers only take tokens). A depth
/// refusal is remembered for a fixed time, its `Retry-After`.
///
/// A request refused so is answered once the `Retry-After` of the refusal
/// has passed, and a random part of a second more, so that the requests held
/// are not all answered, and sent again, at once (at most [`MAX_HOLD_MS`]
/// later): a client that sends again while told to wait (closed-loop,
/// ignoring `Retry-After`) waits as it was told instead of keeping the host
/// busy with refusals, which would slow every tenant's requests and the
/// processor beside them. A client that honours `Retry-After` is never held.
#[derive(Debug, Default)]
pub struct Refusals {
    held: std::collections::HashMap<String, Held>,
    /// Requests refused here per tenant, not yet counted in Redis.
    uncounted: std::collections::HashMap<String, u64>,
}

/// One remembered refusal.
#[derive(Debug)]
struct Held {
    what: Holds,
    /// Until when (a monotonic ms) its `Retry-After` said to wait.
    told_ms: u64,
    problem: Problem,
}

/// What a remembered refusal refuses.
#[derive(Debug)]
enum Holds {
    /// Requests with more writes than the bucket has: it held `tokens_milli`
    /// thousandths of a token at `at_ms`, refilled at `rate` per second up to
    /// `burst`.
    Rate { tokens_milli: u64, at_ms: u64, rate: u64, burst: u64 },
    /// Every request, until then.
    Until(u64),
}

impl Held {
    /// Whether a request of `writes` writes at `now_ms` is refused.
    fn refuses(&self, writes: u64, now_ms: u64) -> bool {
        match self.what {
            Holds::Rate { tokens_milli, at_ms, rate, burst } => {
                let now_milli = tokens_milli.saturating_add(now_ms.saturating_sub(at_ms).saturating_mul(rate)).min(burst.saturating_mul(1000));
                now_milli < writes.saturating_mul(1000)
            }
            Holds::Until(until) => now_ms < until,
        }
    }

    /// Whether it refuses nothing any more.
    fn ended(&self, now_ms: u64) -> bool {
        !self.refuses(1, now_ms)
    }
}

/// The longest a request refused by a remembered refusal is held.
pub const MAX_HOLD_MS: u64 = 2000;

/// The most tenants [`Refusals`] remembers; past it, those whose refusal has
/// ended go (and a new one is not remembered while all still hold).
const MAX_REFUSALS: usize = 256;

impl Refusals {
    /// Whether a refusal of `tenant` is remembered at all (held or ended): a
    /// request of no such tenant needs no clock read to be let through.
    pub fn remembers(&self, tenant: &str) -> bool {
        self.held.contains_key(tenant)
    }

    /// The answer to a request of `writes` of `tenant`'s writes at `now_ms`,
    /// if a refusal of it is sure to hold, and how long to hold it first
    /// (until the time its `Retry-After` told, and `jitter_ms` (below a
    /// second) more, at most [`MAX_HOLD_MS`]; its `Retry-After` what is left
    /// after that); counted.
    pub fn check(&mut self, tenant: &str, writes: u64, now_ms: u64, jitter_ms: u64) -> Option<(Problem, u64)> {
        let held = self.held.get(tenant).filter(|h| h.refuses(writes, now_ms))?;
        let hold = (held.told_ms.saturating_sub(now_ms) + jitter_ms % 1000).min(MAX_HOLD_MS);
        let mut p = held.problem.clone();
        p.retry_after = Some(u32::try_from(held.told_ms.saturating_sub(now_ms + hold).div_ceil(1000).max(1)).unwrap_or(u32::MAX));
        *self.uncounted.entry(tenant.to_owned()).or_default() += 1;
        Some((p, hold))
    }

    /// Remembers that the script refused `tenant` with `problem` at `now_ms`
    /// for its rate: its bucket held `tokens_milli` thousandths of a token,
    /// refilled at `rate` per second up to `burst`. The refusal's answer, held
    /// (see [`Refusals::note`]), if the tenant was told to wait and came back
    /// early.
    pub fn note_rate(&mut self, tenant: &str, problem: &Problem, now_ms: u64, (tokens_milli, rate, burst): (u64, u64, u64), jitter_ms: u64) -> Option<(Problem, u64)> {
        self.note(tenant, problem, now_ms, Holds::Rate { tokens_milli, at_ms: now_ms, rate, burst }, jitter_ms)
    }

    /// Remembers that the script refused `tenant` with `problem` at `now_ms`,
    /// a refusal taken to hold for `for_ms`; its answer held as
    /// [`Refusals::note_rate`]'s.
    pub fn note_for(&mut self, tenant: &str, problem: &Problem, now_ms: u64, for_ms: u64, jitter_ms: u64) -> Option<(Problem, u64)> {
        self.note(tenant, problem, now_ms, Holds::Until(now_ms + for_ms), jitter_ms)
    }

    /// Remembers a refusal by the script. A tenant refused by the script
    /// before the time an earlier refusal here told it to wait (its refusal
    /// here had ended, the bucket refilled, and others took the tokens
    /// first) has not waited as told: its answer is held as a remembered
    /// refusal's are (see [`Refusals::check`]), so that a flood sent again
    /// at once costs a script call and a body parse per `Retry-After`, not
    /// per request. A tenant that waited as told is answered at once.
    fn note(&mut self, tenant: &str, problem: &Problem, now_ms: u64, what: Holds, jitter_ms: u64) -> Option<(Problem, u64)> {
        let early = self.held.get(tenant).is_some_and(|h| now_ms < h.told_ms);
        let full = |held: &std::collections::HashMap<String, Held>| held.len() >= MAX_REFUSALS && !held.contains_key(tenant);
        if full(&self.held) {
            self.held.retain(|_, h| !h.ended(now_ms));
        }
        if full(&self.held) {
            return None;
        }
        let told_ms = now_ms + u64::from(problem.retry_after.unwrap_or(1).max(1)) * 1000;
        self.held.insert(tenant.to_owned(), Held { what, told_ms, problem: problem.clone() });
        if !early {
            return None;
        }
        let hold = (told_ms.saturating_sub(now_ms) + jitter_ms % 1000).min(MAX_HOLD_MS);
        let mut p = problem.clone();
        p.retry_after = Some(u32::try_from(told_ms.saturating_sub(now_ms + hold).div_ceil(1000).max(1)).unwrap_or(u32::MAX));
        Some((p, hold))
    }

    /// The requests of `tenant` refused here since the last call (then
    /// forgotten).
    pub fn take_uncounted(&mut self, tenant: &str) -> u64 {
        self.uncounted.remove(tenant).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rate refusal holds while the refilled bucket is short of a
    /// request's writes, a depth refusal for its time; each refused request
    /// is held to the `Retry-After` told (with its jitter) and counted once.
    #[test]
    fn refusals_hold_while_sure_and_are_counted_once() {
        let mut r = Refusals::default();
        let p = Problem::tenant_throttled("tenant-rate-limited", "Tenant rate limited", "over", 1);
        assert_eq!(r.check("acme", 1, 1000, 0), None);
        assert!(!r.remembers("acme"));
        // 0.5 tokens at t=1000, 10 per second, burst 100.
        assert_eq!(r.note_rate("acme", &p, 1000, (500, 10, 100), 0), None, "the first refusal is answered at once");
        assert!(r.remembers("acme") && !r.remembers("beta"), "only the tenant refused");
        let (again, hold) = r.check("acme", 100, 1100, 250).unwrap();
        assert_eq!((again.kind.as_str(), again.retry_after, hold), (p.kind.as_str(), Some(1), 1150), "held to the second told, and the jitter");
        assert_eq!(r.check("acme", 1, 1100, 0), None, "1.5 tokens by then: a one-write request may pass");
        assert!(r.check("acme", 2, 1100, 0).is_some());
        assert_eq!(r.check("acme", 2, 1150, 0), None, "2 tokens at 1150");
        assert_eq!(r.check("beta", 1, 1100, 0), None, "another tenant");
        let full = Problem::tenant_throttled("tenant-queue-full", "Tenant queue full", "full", 1);
        assert_eq!(r.note_for("beta", &full, 2000, 1000, 0), None);
        let (_, hold) = r.check("beta", 1, 2999, 1999).unwrap();
        assert_eq!(hold, 1000, "jitter below a second");
        assert_eq!(r.check("beta", 1, 3000, 0), None);
        assert_eq!((r.take_uncounted("acme"), r.take_uncounted("acme"), r.take_uncounted("beta")), (2, 0, 1));
        for i in 0..MAX_REFUSALS + 10 {
            r.note_for(&format!("t{i}"), &p, 5000, 10, 0);
        }
        assert!(r.held.len() <= MAX_REFUSALS, "bounded");
        r.note_for("late", &p, 6000, 10, 0);
        assert!(r.check("late", 1, 6001, 0).is_some(), "the ended ones made room");
    }

    /// A tenant the script refuses again before the `Retry-After` its last
    /// refusal here told (it did not wait) gets its answer held to the new
    /// refusal's time, with the jitter, at most `MAX_HOLD_MS`; one that
    /// waited as told, or is refused here for the first time, is answered at
    /// once.
    #[test]
    fn a_tenant_refused_again_before_it_was_told_is_held() {
        let mut r = Refusals::default();
        let p = Problem::tenant_throttled("tenant-rate-limited", "Tenant rate limited", "over", 1);
        // Empty at t=1000, 500 per second, burst 100: a 100-write request
        // passes here again from t=1200, yet it was told to wait until 2000.
        assert_eq!(r.note_rate("flood", &p, 1000, (0, 500, 100), 0), None);
        assert_eq!(r.check("flood", 100, 1200, 0), None, "the bucket has refilled: the script is asked");
        let (again, hold) = r.note_rate("flood", &p, 1200, (0, 500, 100), 300).unwrap();
        assert_eq!((hold, again.retry_after), (1300, Some(1)), "held to the new refusal's second, and the jitter");
        assert_eq!(again.kind, p.kind);
        // Told until 2200 now; refused by the script after it: at once.
        assert_eq!(r.note_rate("flood", &p, 2300, (0, 500, 100), 300), None, "it waited as told");
        let long = Problem::tenant_throttled("tenant-rate-limited", "Tenant rate limited", "over", 5);
        let (_, hold) = r.note_rate("flood", &long, 2400, (0, 500, 100), 999).unwrap();
        assert_eq!(hold, MAX_HOLD_MS, "never longer than the most a request is held");
        let full = Problem::tenant_throttled("tenant-queue-full", "Tenant queue full", "full", 1);
        assert_eq!(r.note_for("deep", &full, 0, 1000, 0), None);
        assert!(r.note_for("deep", &full, 500, 1000, 0).is_some(), "a depth refusal likewise");
        assert_eq!(r.take_uncounted("flood"), 0, "the script counted these refusals itself");
        // With every slot taken by refusals still holding, a tenant already
        // remembered is still noted again (and held): it takes no new slot.
        assert_eq!(r.note_for("kept", &full, 10_000, 60_000, 0), None);
        for i in 0..MAX_REFUSALS {
            r.note_for(&format!("t{i}"), &full, 10_000, 60_000, 0);
        }
        assert_eq!(r.held.len(), MAX_REFUSALS, "full");
        assert!(r.note_for("kept", &full, 10_500, 60_000, 0).is_some(), "noted again, and held");
        assert_eq!(r.note_for("newcomer", &full, 10_500, 60_000, 0), None, "no slot for a new one");
        assert!(!r.held.contains_key("newcomer"));
    }

    /// Names: the documented charset and length, nothing else.
    #[test]
    fn tenant_names() {
        for ok in ["a", "acme-corp", "A.b_c-9", &"x".repeat(64)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "a b", "a:b", "a{b}", "é", "x/y", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert!(NAME_RULE.starts_with(&format!("1 to {MAX_NAME} ")), "the rule names the limit");
    }

    /// Overrides inherit what they leave out; a burst follows its own rate.
    #[test]
    fn overrides_and_defaults() {
        let default = Quota { rate: 100, burst: 0, depth: 1000 };
        let t = Tenancy::parse("header", default, r#"{"gold": {"rate": 5000}, "tiny": {"depth": 10, "burst": 3}, "deep": {"depth": 5}}"#).unwrap();
        assert_eq!(t.quota("anyone"), Quota { rate: 100, burst: 100, depth: 1000 });
        let bursty = Tenancy::parse("header", Quota { rate: 100, burst: 500, depth: 0 }, r#"{"deep": {"depth": 5}, "fast": {"rate": 300}}"#).unwrap();
        assert_eq!(bursty.quota("deep"), Quota { rate: 100, burst: 500, depth: 5 }, "the default burst, with the default rate");
        assert_eq!(bursty.quota("fast").burst, 300, "its own rate's second");
        assert_eq!(t.quota("gold"), Quota { rate: 5000, burst: 5000, depth: 1000 });
        assert_eq!(t.quota("tiny"), Quota { rate: 100, burst: 3, depth: 10 });
        assert_eq!(Tenancy::parse("", Quota::default(), "").unwrap(), Tenancy::default());
        assert!(!Tenancy::default().default.limits());
        for (from, overrides, name) in [
            ("cookie", "", "tenant_from"),
            ("key:", "", "tenant_from"),
            ("header", "[1]", "tenant_overrides"),
            ("header", r#"{"a b": {}}"#, "tenant_overrides"),
            ("header", r#"{"a": {"rate": -1}}"#, "tenant_overrides"),
            ("header", r#"{"a": {"rates": 1}}"#, "tenant_overrides"),
        ] {
            assert_eq!(Tenancy::parse(from, default, overrides).unwrap_err().0, name, "{from} {overrides}");
        }
    }

    /// A key's tenant is its part before the separator, if it has one.
    #[test]
    fn tenants_of_keys() {
        let t = Tenancy::parse("key::", Quota::default(), "").unwrap();
        assert_eq!((t.of_key("acme:order:7"), t.of_key("plain")), (Some("acme"), None));
        assert_eq!(Tenancy::default().of_key("acme:order:7"), None);
    }

    /// A group of shards enforces its share, rounded up; never 0 for a limit.
    #[test]
    fn shares_of_a_quota() {
        let q = Quota { rate: 100, burst: 150, depth: 0 };
        assert_eq!(q.share(16, 16), q);
        assert_eq!(q.share(1, 16), Quota { rate: 7, burst: 10, depth: 0 });
        assert_eq!(Quota { rate: 1, burst: 1, depth: 3 }.share(1, 16), Quota { rate: 1, burst: 1, depth: 1 });
        assert_eq!(q.share(8, 16), Quota { rate: 50, burst: 75, depth: 0 });
    }
}
