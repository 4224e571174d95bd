//! Applying writes to records: the built-in operations, preconditions and ETags.
//! A write whose operation fails is *rejected* with a reason; it is never retried.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::layout::md5_hex;
use crate::write::{Op, Write};

/// A stored record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The JSON document.
    pub value: Value,
    /// Incremented by every applied write.
    pub version: u64,
    /// MD5 of the canonical value bytes (hex).
    pub etag: String,
    /// Milliseconds since the Unix epoch of the last applied write.
    pub updated_at: i64,
}

/// Canonical bytes of a value (object members sorted by key).
pub fn canonical(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

/// The ETag of a value: MD5 of its canonical bytes, hex.
pub fn etag(value: &Value) -> String {
    md5_hex(&canonical(value))
}

/// What happened to one write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// Applied; the record's resulting version.
    Applied {
        /// Version after this write.
        version: u64,
        /// The record's value after this write (`None`: the write deleted it): one
        /// entry of the key's change feed. Not part of the outcome's JSON.
        #[serde(skip)]
        value: Option<Value>,
    },
    /// Refused by its operation or precondition.
    Rejected {
        /// Why.
        reason: String,
    },
}

/// RFC 7396 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else { unreachable!("made an object above") };
    for (k, v) in patch {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// Applies one write to the current record (`None`: absent). `Ok(None)` means the
/// record is deleted; `Err` is the rejection reason.
pub fn apply(current: Option<&Record>, write: &Write, now_ms: i64) -> Result<Option<Record>, String> {
    let mut record = current.cloned();
    apply_in_place(&mut record, 0, write, now_ms)?;
    if let Some(r) = &mut record {
        r.etag = etag(&r.value);
    }
    Ok(record)
}

/// An object member of the record to change, checked before anything changes.
fn object_mut(record: &mut Option<Record>) -> Result<&mut Map<String, Value>, String> {
    if record.as_ref().is_some_and(|r| !r.value.is_object()) {
        return Err("the record is not a JSON object".into());
    }
    let r = record.get_or_insert_with(|| Record { value: Value::Object(Map::new()), version: 0, etag: String::new(), updated_at: 0 });
    match &mut r.value {
        Value::Object(o) => Ok(o),
        _ => unreachable!("checked above"),
    }
}

/// Applies one write to `record` where it lies, leaving it untouched when the
/// write is rejected (every check comes before any change). `absent_version` is the
/// version of an absent record: the version its deletion reached (0 if it never
/// existed), so versions keep growing through a delete and a re-create. Returns
/// the record's new version. The ETag is left to the caller ([`plan_batch`]
/// computes it once per key and batch, not once per write).
// A little over the usual length: one arm per operation, all checks before
// any change.
fn apply_in_place(record: &mut Option<Record>, absent_version: u64, write: &Write, now_ms: i64) -> Result<u64, String> {
    let version = record.as_ref().map_or(absent_version, |r| r.version);
    if let Some(expected) = write.if_version
        && expected != version
    {
        return Err(format!("precondition failed: the record is at version {version}, not {expected}"));
    }
    match &write.op {
        Op::Delete => {
            *record = None;
            return Ok(version + 1);
        }
        Op::Put { value } => {
            *record = Some(Record { value: value.clone(), version, etag: String::new(), updated_at: now_ms });
        }
        Op::Merge { patch } => {
            let r = record.get_or_insert_with(|| Record { value: Value::Null, version, etag: String::new(), updated_at: now_ms });
            merge_patch(&mut r.value, patch);
        }
        Op::Incr { field, by, min, max } => {
            let current = match record.as_ref().map(|r| &r.value) {
                Some(Value::Object(o)) => o.get(field),
                Some(_) => return Err("the record is not a JSON object".into()),
                None => None,
            };
            let now = match current {
                None | Some(Value::Null) => 0,
                Some(v) => v.as_i64().ok_or_else(|| format!("field {field:?} is not an integer"))?,
            };
            let next = now.checked_add(*by).ok_or_else(|| format!("field {field:?} would overflow"))?;
            if let Some(lo) = min.filter(|lo| next < *lo) {
                return Err(format!("{field} would become {next}, below the minimum {lo}"));
            }
            if let Some(hi) = max.filter(|hi| next > *hi) {
                return Err(format!("{field} would become {next}, above the maximum {hi}"));
            }
            object_mut(record)?.insert(field.clone(), Value::from(next));
        }
        Op::Append { field, value, max_len } => {
            let len = match record.as_ref().map(|r| &r.value) {
                Some(Value::Object(o)) => match o.get(field) {
                    None => 0,
                    Some(Value::Array(items)) => items.len(),
                    Some(_) => return Err(format!("field {field:?} is not an array")),
                },
                Some(_) => return Err("the record is not a JSON object".into()),
                None => 0,
            };
            if let Some(limit) = max_len.filter(|l| len as u64 >= *l) {
                return Err(format!("{field} already has {len} elements; the maximum is {limit}"));
            }
            let obj = object_mut(record)?;
            match obj.entry(field.clone()).or_insert_with(|| Value::Array(Vec::new())) {
                Value::Array(items) => items.push(value.clone()),
                _ => unreachable!("checked above"),
            }
        }
    }
    let r = record.as_mut().expect("every branch above leaves a record");
    r.version = version + 1;
    r.updated_at = now_ms;
    Ok(version + 1)
}

/// The apply step for one key, as the `spillway:pipeline/apply` interface
/// defines it (`wit/pipeline.wit`) for the built-in operations: `writes` in
/// order to a key whose value is `value` (`None`: absent) at `version`. One
/// result per write: the value it left (`None`: deleted), or why it was
/// rejected. Each applied write raises the version by one; [`plan_batch`] does
/// the same for a whole batch.
pub fn apply_key(value: Option<Value>, version: u64, writes: &[Write], now_ms: i64) -> Vec<Result<Option<Value>, String>> {
    let mut record = value.map(|value| Record { value, version, etag: String::new(), updated_at: now_ms });
    let mut absent_version = version;
    writes
        .iter()
        .map(|w| {
            let v = apply_in_place(&mut record, absent_version, w, now_ms)?;
            if record.is_none() {
                absent_version = v;
            }
            Ok(record.as_ref().map(|r| r.value.clone()))
        })
        .collect()
}

/// One key's writes as the apply step gets them: `(write id, payload)` in order,
/// the payload being the write's JSON text.
pub type StepWrites<'a> = [(&'a str, &'a str)];

/// What the apply step made of one key's writes: one result per write (the value
/// it left, `None` if it deleted the key; or why it was rejected), or the step's
/// own failure (none of the writes is applied).
pub type StepResult = Result<Vec<Result<Option<Value>, String>>, String>;

/// The built-in operations as an apply step: each payload read as a [`Write`]
/// (one that does not parse, or names another key, is rejected alone), then
/// [`apply_key`].
pub fn builtin_step(key: &str, value: Option<&Value>, version: u64, writes: &StepWrites<'_>, now_ms: i64) -> StepResult {
    let parsed: Vec<Result<Write, String>> = writes
        .iter()
        .map(|(id, payload)| {
            let write: Write = serde_json::from_str(payload).map_err(|e| format!("unreadable write: {e}"))?;
            if write.key != key {
                return Err(format!("write {id} is for key {:?}, not {key:?}", write.key));
            }
            Ok(write)
        })
        .collect();
    let readable: Vec<Write> = parsed.iter().filter_map(|w| w.as_ref().ok().cloned()).collect();
    let mut applied = apply_key(value.cloned(), version, &readable, now_ms).into_iter();
    Ok(parsed
        .into_iter()
        .map(|w| w.and_then(|_| applied.next().unwrap_or_else(|| Err("no outcome".into()))))
        .collect())
}

/// [`builtin_step`] with values as JSON text, as they cross the apply step's
/// interface (`wit/pipeline.wit`): the current value in (`None`: absent), and
/// each applied write's value out as canonical JSON (`None`: deleted). A stored
/// value that is not JSON fails the step.
pub fn builtin_step_text(key: &str, value: Option<&str>, version: u64, writes: &StepWrites<'_>, now_ms: i64) -> Result<Vec<Result<Option<String>, String>>, String> {
    let value: Option<Value> = value.map(serde_json::from_str).transpose().map_err(|e| format!("the stored value of {key:?} is not JSON: {e}"))?;
    Ok(builtin_step(key, value.as_ref(), version, writes, now_ms)?
        .into_iter()
        .map(|r| r.map(|v| v.map(|v| String::from_utf8(canonical(&v)).unwrap_or_default())))
        .collect())
}

/// The effect of a batch: final state of every touched key (changed by the batch,
/// or by an earlier delivery of one of its writes), and an outcome per write not
/// applied before.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Final record per touched key (`None`: deleted), for the database and the
    /// cache.
    pub records: BTreeMap<String, Option<Record>>,
    /// The version a deleted key's deletion reached, for each key of `records`
    /// that is `None` (kept as a tombstone so versions never go back).
    pub deleted: BTreeMap<String, u64>,
    /// `(write id, key, outcome)`, each key's in batch order, skipping writes
    /// applied before.
    pub outcomes: Vec<(String, String, Outcome)>,
    /// Keys whose apply step failed: `(key, write ids, error)`. None of those
    /// writes has an outcome; the key keeps its state.
    pub failed: Vec<(String, Vec<String>, String)>,
}

/// [`plan_with`] over the built-in operations.
pub fn plan_batch(
    existing: BTreeMap<String, Record>,
    tombstones: &BTreeMap<String, u64>,
    writes: &[(String, Write)],
    already: &HashSet<String>,
    now_ms: i64,
) -> Plan {
    let queued: Vec<(String, String, String)> =
        writes.iter().map(|(id, w)| (id.clone(), w.key.clone(), serde_json::to_string(w).unwrap_or_default())).collect();
    // The built-in step never waits: one poll finishes the plan.
    at_once(plan_with(existing, tombstones, &HashMap::new(), &queued, already, now_ms, async |key, value, version, writes| builtin_step(key, value, version, writes, now_ms)))
}

/// The write a queued expiry (`{"op": "$expire", "of": <write id>}`) is for;
/// `None` for any other write.
fn expiry_of(payload: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Expiry {
        op: String,
        of: Option<String>,
    }
    if !payload.contains(r#""op":"$expire""#) {
        return None;
    }
    serde_json::from_str::<Expiry>(payload).ok().filter(|e| e.op == "$expire").and_then(|e| e.of)
}

/// The output of a future that finishes without waiting.
fn at_once<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut std::task::Context::from_waker(std::task::Waker::noop())) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => unreachable!("a future that never waits"),
    }
}

/// Applies queued writes `(write id, key, payload)`, each key's in order, to the
/// stored state of their keys through `step` (called once per key with the
/// key's value, `None` if absent, its version and its writes), skipping ids in
/// `already` (applied by an earlier delivery): the exactly-once effect.
/// `existing` holds the records there are; `tombstones` the version of each
/// deleted key, so that a re-created key carries on from it; `heads` each
/// key's last applied write. Versions are the plan's: every applied write
/// raises its key's by one.
///
/// A record's expiry (`{"op": "$expire", "of": <write id>}`, scheduled by
/// intake for a write with `ttl_ms`) is not the step's: it goes to the step as
/// a deletion if `of` is still the key's last applied write, and is rejected
/// otherwise (a later write changed the record, or `of` never applied). The
/// step is then called once per run of writes between expiries.
// Long on purpose: one pass over the keys in order, whose state (records,
// tombstones, outcomes, failures) is threaded through the loop; split, each
// part would need all of it.
pub async fn plan_with(
    mut existing: BTreeMap<String, Record>,
    tombstones: &BTreeMap<String, u64>,
    heads: &HashMap<String, Option<String>>,
    writes: &[(String, String, String)],
    already: &HashSet<String>,
    now_ms: i64,
    mut step: impl AsyncFnMut(&str, Option<&Value>, u64, &StepWrites<'_>) -> StepResult,
) -> Plan {
    let mut plan = Plan::default();
    let mut seen = HashSet::new();
    // Each key's writes to apply, keys in order of first appearance.
    let mut order: Vec<&str> = Vec::new();
    let mut by_key: BTreeMap<&str, Vec<(&str, &str)>> = BTreeMap::new();
    let mut touched = BTreeSet::new();
    for (id, key, payload) in writes {
        if !seen.insert(id.as_str()) {
            continue;
        }
        if already.contains(id) {
            // Recorded by an earlier delivery whose processor may have died before
            // refreshing the cache: the key's current state is written again (if
            // any write ever applied to it: a record or a tombstone).
            if existing.contains_key(key) || tombstones.get(key).is_some_and(|v| *v > 0) {
                touched.insert(key.clone());
            }
            continue;
        }
        by_key
            .entry(key)
            .or_insert_with(|| {
                order.push(key);
                Vec::new()
            })
            .push((id, payload));
    }
    for key in order {
        let group = &by_key[key];
        let mut record = existing.remove(key);
        let mut version = record.as_ref().map_or_else(|| tombstones.get(key).copied().unwrap_or(0), |r| r.version);
        let mut head: Option<String> = heads.get(key).cloned().flatten();
        let deletion = serde_json::json!({"key": key, "op": "delete"}).to_string();
        // The key's writes in runs through the step: an expiry alone (as a
        // deletion, if the write it expires is still the key's last one
        // applied), the writes between expiries together.
        let mut rest: &[(&str, &str)] = group;
        while let Some(&(first, payload)) = rest.first() {
            let run: Vec<(&str, &str)> = match expiry_of(payload) {
                Some(of) if head.as_deref() == Some(of.as_str()) => vec![(first, deletion.as_str())],
                Some(of) => {
                    let reason = match &head {
                        Some(later) if later != &of => format!("not expired: write {later} changed the record after {of}"),
                        _ => format!("not expired: write {of} did not apply"),
                    };
                    plan.outcomes.push((first.to_owned(), key.to_owned(), Outcome::Rejected { reason }));
                    rest = &rest[1..];
                    continue;
                }
                None => rest.iter().take_while(|(_, p)| expiry_of(p).is_none()).copied().collect(),
            };
            let results = match step(key, record.as_ref().map(|r| &r.value), version, &run).await {
                Ok(r) if r.len() == run.len() => Ok(r),
                Ok(r) => Err(format!("the apply step returned {} outcomes for {} writes", r.len(), run.len())),
                Err(e) => Err(e),
            };
            let results = match results {
                Ok(r) => r,
                Err(error) => {
                    // This run and the key's later writes fail; earlier runs stand.
                    plan.failed.push((key.to_owned(), rest.iter().map(|(id, _)| (*id).to_owned()).collect(), error));
                    break;
                }
            };
            for ((id, _), result) in run.iter().zip(results) {
                let outcome = match result {
                    Ok(value) => {
                        version += 1;
                        touched.insert(key.to_owned());
                        head = Some((*id).to_owned());
                        record = value.clone().map(|value| Record { value, version, etag: String::new(), updated_at: now_ms });
                        Outcome::Applied { version, value }
                    }
                    Err(reason) => Outcome::Rejected { reason },
                };
                plan.outcomes.push(((*id).to_owned(), key.to_owned(), outcome));
            }
            rest = &rest[run.len()..];
        }
        match record {
            Some(r) => {
                existing.insert(key.to_owned(), r);
            }
            None => {
                plan.deleted.insert(key.to_owned(), version);
            }
        }
    }
    for key in touched {
        match existing.remove(&key) {
            Some(mut r) => {
                r.etag = etag(&r.value);
                plan.records.insert(key, Some(r));
            }
            None => {
                let v = plan.deleted.get(&key).copied().or_else(|| tombstones.get(&key).copied()).unwrap_or(0);
                plan.deleted.insert(key.clone(), v);
                plan.records.insert(key, None);
            }
        }
    }
    // Only touched keys' deletions are kept.
    let records = &plan.records;
    plan.deleted.retain(|k, _| records.get(k).is_some_and(Option::is_none));
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn w(v: Value) -> Write {
        serde_json::from_value(v).unwrap()
    }

    /// The per-key apply step, write by write: values, rejections, and versions
    /// through a delete and a re-create (each applied write raises the version
    /// by one, a rejected one does not).
    #[test]
    fn apply_key_applies_in_order() {
        let writes = [
            w(json!({"key": "k", "op": "incr", "field": "n", "by": 2})),
            w(json!({"key": "k", "op": "incr", "field": "n", "by": -5, "min": 0})),
            w(json!({"key": "k", "op": "append", "field": "log", "value": "a"})),
            w(json!({"key": "k", "op": "delete", "if_version": 7})),
            w(json!({"key": "k", "op": "delete", "if_version": 6})),
            w(json!({"key": "k", "op": "put", "value": {"fresh": true}, "if_version": 7})),
            w(json!({"key": "k", "op": "merge", "patch": {"more": 1}})),
        ];
        let keyed = apply_key(Some(json!({"n": 1})), 4, &writes, 9);
        assert_eq!(keyed[0], Ok(Some(json!({"n": 3}))), "version 5");
        assert!(keyed[1].as_ref().is_err_and(|r| r.contains("below the minimum 0")), "{:?}", keyed[1]);
        assert_eq!(keyed[2], Ok(Some(json!({"n": 3, "log": ["a"]}))), "version 6");
        assert!(keyed[3].as_ref().is_err_and(|r| r.contains("version 6, not 7")), "{:?}", keyed[3]);
        assert_eq!(keyed[4], Ok(None), "deleted at version 7");
        assert_eq!(keyed[5], Ok(Some(json!({"fresh": true}))), "re-created at version 8, its precondition 7 met");
        assert_eq!(keyed[6], Ok(Some(json!({"fresh": true, "more": 1}))));
        // The batch plan numbers the same outcomes.
        let ids: Vec<(String, Write)> = writes.iter().enumerate().map(|(i, w)| (format!("1-{i}-0"), w.clone())).collect();
        let existing = BTreeMap::from([("k".to_owned(), Record { value: json!({"n": 1}), version: 4, etag: String::new(), updated_at: 0 })]);
        let plan = plan_batch(existing, &BTreeMap::new(), &ids, &HashSet::new(), 9);
        let versions: Vec<Option<u64>> = plan
            .outcomes
            .iter()
            .map(|(_, _, o)| match o {
                Outcome::Applied { version, .. } => Some(*version),
                Outcome::Rejected { .. } => None,
            })
            .collect();
        assert_eq!(versions, vec![Some(5), None, Some(6), None, Some(7), Some(8), Some(9)]);
        assert_eq!(plan.records["k"].as_ref().unwrap().version, 9);
    }

    /// RFC 7396's examples hold.
    #[test]
    fn merge_patch_rfc_examples() {
        let cases = [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (json!({"a": "b"}), json!({"b": "c"}), json!({"a": "b", "b": "c"})),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (json!({"a": [{"b": "c"}]}), json!({"a": [1]}), json!({"a": [1]})),
            (json!(["a", "b"]), json!({"a": "c"}), json!({"a": "c"})),
            (json!({"e": null}), json!({"a": 1}), json!({"e": null, "a": 1})),
            (json!({}), json!({"a": {"bb": {"ccc": null}}}), json!({"a": {"bb": {}}})),
        ];
        for (mut t, p, r) in cases {
            merge_patch(&mut t, &p);
            assert_eq!(t, r);
        }
    }

    /// A bounded decrement stops at its bound and says why.
    #[test]
    fn bounded_incr_rejects() {
        let r = apply(None, &w(json!({"key": "k", "op": "put", "value": {"stock": 1}})), 1).unwrap();
        let dec = w(json!({"key": "k", "op": "incr", "field": "stock", "by": -1, "min": 0}));
        let r = apply(r.as_ref(), &dec, 2).unwrap();
        assert_eq!(r.as_ref().unwrap().value, json!({"stock": 0}));
        assert_eq!(r.as_ref().unwrap().version, 2);
        let e = apply(r.as_ref(), &dec, 3).unwrap_err();
        assert!(e.contains("below the minimum 0"), "{e}");
    }

    /// Appends keep order and respect max_len; preconditions check versions.
    #[test]
    fn append_and_preconditions() {
        let a = |v: i64| w(json!({"key": "k", "op": "append", "field": "l", "value": v, "max_len": 2}));
        let r1 = apply(None, &a(1), 0).unwrap();
        let r2 = apply(r1.as_ref(), &a(2), 0).unwrap();
        assert_eq!(r2.as_ref().unwrap().value, json!({"l": [1, 2]}));
        assert!(apply(r2.as_ref(), &a(3), 0).is_err());
        let guarded = w(json!({"key": "k", "op": "delete", "if_version": 1}));
        assert!(apply(r2.as_ref(), &guarded, 0).unwrap_err().contains("version 2"));
    }

    /// A batch skips already-applied ids and duplicates, applying the rest in order.
    #[test]
    fn plan_is_exactly_once() {
        let inc = w(json!({"key": "k", "op": "incr", "field": "n"}));
        let writes = vec![("a".into(), inc.clone()), ("b".into(), inc.clone()), ("b".into(), inc.clone()), ("c".into(), inc)];
        let already: HashSet<String> = ["a".to_owned()].into();
        let plan = plan_batch(BTreeMap::new(), &BTreeMap::new(), &writes, &already, 0);
        assert_eq!(plan.outcomes.len(), 2);
        // A redelivered batch whose writes were all applied still refreshes its keys.
        let existing = BTreeMap::from([("k".to_owned(), plan.records["k"].clone().unwrap())]);
        let redelivered = plan_batch(existing, &BTreeMap::new(), &writes[..1], &already, 9);
        assert!(redelivered.outcomes.is_empty());
        assert_eq!(redelivered.records["k"].as_ref().unwrap().version, 2);
        assert_eq!(plan.records["k"].as_ref().unwrap().value, json!({"n": 2}));
        assert_eq!(plan.outcomes[1].2, Outcome::Applied { version: 2, value: Some(json!({"n": 2})) });
    }

    /// Versions keep growing through a delete and a re-create, within a batch and
    /// across batches (from the tombstone), and every applied write carries the
    /// value it produced.
    #[test]
    fn versions_survive_deletion() {
        let put = |n: i64| w(json!({"key": "k", "op": "put", "value": {"n": n}}));
        let del = w(json!({"key": "k", "op": "delete"}));
        let writes = vec![("a".into(), put(1)), ("b".into(), del.clone()), ("c".into(), put(2)), ("d".into(), del)];
        let plan = plan_batch(BTreeMap::new(), &BTreeMap::new(), &writes, &HashSet::new(), 0);
        let versions: Vec<_> = plan
            .outcomes
            .iter()
            .map(|(_, _, o)| match o {
                Outcome::Applied { version, value } => (*version, value.clone()),
                Outcome::Rejected { reason } => panic!("{reason}"),
            })
            .collect();
        assert_eq!(versions, vec![(1, Some(json!({"n": 1}))), (2, None), (3, Some(json!({"n": 2}))), (4, None)]);
        assert_eq!(plan.records["k"], None);
        assert_eq!(plan.deleted["k"], 4);

        let tombstones = BTreeMap::from([("k".to_owned(), 4)]);
        let plan = plan_batch(BTreeMap::new(), &tombstones, &[("e".into(), put(3))], &HashSet::new(), 0);
        assert_eq!(plan.records["k"].as_ref().unwrap().version, 5);
        assert!(plan.deleted.is_empty());
        let guarded = w(json!({"key": "k", "op": "put", "value": 1, "if_version": 4}));
        let plan = plan_batch(BTreeMap::new(), &tombstones, &[("f".into(), guarded)], &HashSet::new(), 0);
        assert_eq!(plan.outcomes[0].2, Outcome::Applied { version: 5, value: Some(json!(1)) });
    }

    /// A record's expiry deletes it only while the write that set its ttl is
    /// the key's last applied one (from the database's head, or earlier in the
    /// round); otherwise it is rejected, saying why.
    #[test]
    fn an_expiry_deletes_only_what_its_write_left() {
        let put = |n: i64| serde_json::to_string(&json!({"key": "k", "op": "put", "value": n})).unwrap();
        let expire = |of: &str| serde_json::to_string(&json!({"key": "k", "op": "$expire", "of": of})).unwrap();
        let run = |head: Option<&str>, writes: Vec<(&str, String)>| {
            let existing = BTreeMap::from([("k".to_owned(), Record { value: json!(0), version: 3, etag: String::new(), updated_at: 0 })]);
            let heads = HashMap::from([("k".to_owned(), head.map(str::to_owned))]);
            let queued: Vec<(String, String, String)> = writes.into_iter().map(|(id, p)| (id.to_owned(), "k".to_owned(), p)).collect();
            let plan = at_once(plan_with(existing, &BTreeMap::new(), &heads, &queued, &HashSet::new(), 0, async |key, value, version, ws| {
                builtin_step(key, value, version, ws, 0)
            }));
            (plan.outcomes.into_iter().map(|(id, _, o)| (id, o)).collect::<Vec<_>>(), plan.records.get("k").cloned().flatten())
        };
        let (outcomes, record) = run(Some("p0"), vec![("x0", expire("p0"))]);
        assert_eq!((outcomes, record), (vec![("x0".to_owned(), Outcome::Applied { version: 4, value: None })], None));
        let (outcomes, record) = run(Some("p0"), vec![("p1", put(2)), ("x0", expire("p0"))]);
        assert_eq!(outcomes[1], ("x0".to_owned(), Outcome::Rejected { reason: "not expired: write p1 changed the record after p0".into() }));
        assert_eq!(record.map(|r| (r.value, r.version)), Some((json!(2), 4)));
        let (outcomes, record) = run(Some("p0"), vec![("p1", put(2)), ("x1", expire("p1")), ("p2", put(5))]);
        let versions: Vec<Option<u64>> = outcomes.iter().map(|(_, o)| match o {
            Outcome::Applied { version, .. } => Some(*version),
            Outcome::Rejected { .. } => None,
        }).collect();
        assert_eq!(versions, [Some(4), Some(5), Some(6)], "put, its expiry, a re-creation: {outcomes:?}");
        assert_eq!(record.map(|r| r.value), Some(json!(5)));
        let (outcomes, _) = run(None, vec![("x9", expire("p9"))]);
        assert_eq!(outcomes, [("x9".to_owned(), Outcome::Rejected { reason: "not expired: write p9 did not apply".into() })]);
        assert_eq!(expiry_of(&put(1)), None);
        assert_eq!(expiry_of(&serde_json::to_string(&json!({"key": "k", "op": "put", "value": {"op": "$expire", "of": "p"}})).unwrap()), None, "a value that looks like one");
    }

    /// A key whose apply step fails (or answers for the wrong number of writes)
    /// keeps its state and has no outcomes; the batch's other keys are applied.
    #[test]
    fn a_failing_step_fails_its_key_alone() {
        let inc = |k: &str| serde_json::to_string(&json!({"key": k, "op": "incr", "field": "n"})).unwrap();
        let writes: Vec<(String, String, String)> = [("a", "good"), ("b", "bad"), ("c", "good"), ("d", "short"), ("e", "short")]
            .iter()
            .map(|(id, k)| ((*id).to_owned(), (*k).to_owned(), inc(k)))
            .collect();
        let existing = BTreeMap::from([("bad".to_owned(), Record { value: json!({"n": 5}), version: 5, etag: String::new(), updated_at: 0 })]);
        let (tombstones, none) = (BTreeMap::new(), HashSet::new());
        let plan = at_once(plan_with(existing, &tombstones, &HashMap::new(), &writes, &none, 1, async |key, value, version, ws| match key {
            "bad" => Err("boom".into()),
            "short" => Ok(vec![Ok(None)]),
            _ => builtin_step(key, value, version, ws, 1),
        }));
        assert_eq!(plan.records.keys().collect::<Vec<_>>(), vec!["good"]);
        assert_eq!(plan.records["good"].as_ref().unwrap().value, json!({"n": 2}));
        let ids: Vec<&str> = plan.outcomes.iter().map(|(id, _, _)| id.as_str()).collect();
        assert_eq!(ids, vec!["a", "c"]);
        assert_eq!(plan.failed[0], ("bad".to_owned(), vec!["b".to_owned()], "boom".to_owned()));
        assert_eq!(plan.failed[1].1, vec!["d".to_owned(), "e".to_owned()]);
        assert!(plan.failed[1].2.contains("1 outcomes for 2 writes"), "{}", plan.failed[1].2);
    }

    /// The step over JSON text: the value out is canonical (members sorted), a
    /// deletion is `None`, and a stored value that is not JSON fails the step.
    #[test]
    fn builtin_step_over_text() {
        let merge = r#"{"key":"k","op":"merge","patch":{"b":1,"a":2}}"#;
        let del = r#"{"key":"k","op":"delete"}"#;
        let out = builtin_step_text("k", Some(r#"{"c": 0}"#), 3, &[("1-1-0", merge), ("1-2-0", del)], 0).unwrap();
        assert_eq!(out, vec![Ok(Some(r#"{"a":2,"b":1,"c":0}"#.to_owned())), Ok(None)]);
        let e = builtin_step_text("k", Some("{nope"), 3, &[("1-1-0", del)], 0).unwrap_err();
        assert!(e.contains("not JSON"), "{e}");
    }
}
