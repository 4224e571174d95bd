//! The write model: what a client asks to change, and the validation that happens
//! before anything reaches Redis.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::problem::Problem;
use crate::schedule::{self, Due, Timing};

/// One write to one record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Write {
    /// The record key.
    pub key: String,
    /// What to do.
    #[serde(flatten)]
    pub op: Op,
    /// Apply only if the record's current version is this (0: the record is absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub if_version: Option<u64>,
}

/// The operation of a write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Replace the whole value.
    Put {
        /// The new value.
        value: Value,
    },
    /// RFC 7396 JSON merge patch.
    Merge {
        /// The patch.
        patch: Value,
    },
    /// Add `by` to a numeric field, refusing to leave `[min, max]`.
    Incr {
        /// Top-level field of the record (an object).
        field: String,
        /// The increment (may be negative).
        #[serde(default = "one")]
        by: i64,
        /// Lower bound of the result.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        min: Option<i64>,
        /// Upper bound of the result.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max: Option<i64>,
    },
    /// Append to an array field.
    Append {
        /// Top-level field of the record (an object).
        field: String,
        /// The element to append.
        value: Value,
        /// Refuse when the array already has this many elements.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_len: Option<u64>,
    },
    /// Remove the record.
    Delete,
}

fn one() -> i64 {
    1
}

/// Limits enforced before any Redis call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Request body size in bytes.
    pub max_body_bytes: usize,
    /// Writes in one batch request.
    pub max_batch: usize,
    /// Key length in characters.
    pub max_key_len: usize,
    /// Serialized size of a write's value/patch in bytes.
    pub max_value_bytes: usize,
    /// Nesting depth of a write's value/patch.
    pub max_json_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            max_batch: 100,
            max_key_len: 256,
            max_value_bytes: 64 << 10,
            max_json_depth: 32,
        }
    }
}

/// Nesting depth of a JSON value (a scalar is 0).
pub fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Whether `c` may appear in a record key: printable ASCII without spaces, plus any
/// non-ASCII character that is not a control character.
fn key_char_ok(c: char) -> bool {
    if c.is_ascii() {
        c.is_ascii_graphic()
    } else {
        !c.is_control()
    }
}

/// Checks a record key: 1 to `max_key_len` characters, none of them a space or a
/// control character; `field` is the JSON pointer the error names.
pub fn check_key(key: &str, limits: &Limits, field: &str) -> Result<(), Problem> {
    if key.is_empty() {
        return Err(Problem::invalid("key must not be empty", field));
    }
    let chars = key.chars().count();
    if chars > limits.max_key_len {
        return Err(Problem::invalid(&format!("key is {chars} characters; the limit is {}", limits.max_key_len), field));
    }
    if let Some(c) = key.chars().find(|c| !key_char_ok(*c)) {
        return Err(Problem::invalid(
            &format!("key contains a forbidden character {c:?} (spaces and control characters are not allowed)"),
            field,
        ));
    }
    Ok(())
}

impl Write {
    /// Checks the write against `limits`; `pointer` is the JSON pointer of this write
    /// in the request (for the error's field).
    pub fn validate(&self, limits: &Limits, pointer: &str) -> Result<(), Problem> {
        check_key(&self.key, limits, &format!("{pointer}/key"))?;
        match &self.op {
            Op::Incr { field, .. } | Op::Append { field, .. } if field.is_empty() => {
                return Err(Problem::invalid("field must not be empty", &format!("{pointer}/field")));
            }
            _ => {}
        }
        let (value, field) = match &self.op {
            Op::Put { value } | Op::Append { value, .. } => (Some(value), "value"),
            Op::Merge { patch } => (Some(patch), "patch"),
            Op::Incr { .. } | Op::Delete => (None, ""),
        };
        if let Some(v) = value {
            let d = depth(v);
            if d > limits.max_json_depth {
                return Err(Problem::invalid(
                    &format!("{field} nests {d} levels deep; the limit is {}", limits.max_json_depth),
                    &format!("{pointer}/{field}"),
                ));
            }
            let size = serde_json::to_vec(v).map(|b| b.len()).unwrap_or(usize::MAX);
            if size > limits.max_value_bytes {
                return Err(Problem::invalid(
                    &format!("{field} is {size} bytes; the limit is {}", limits.max_value_bytes),
                    &format!("{pointer}/{field}"),
                ));
            }
        }
        Ok(())
    }
}

/// The built-in operations' names.
pub const BUILTIN_OPS: [&str; 5] = ["put", "merge", "incr", "append", "delete"];

/// A write intake accepted: a built-in operation (checked member by member), or
/// an operation the apply implementation declares, whose members that
/// implementation validates when it applies the write.
#[derive(Debug, Clone, PartialEq)]
pub enum Accepted {
    /// A built-in operation.
    Builtin(Write),
    /// A declared operation: the whole write object as sent (`key`, `op`,
    /// `if_version` if given, and the operation's own members).
    Custom {
        /// The record key.
        key: String,
        /// The write object.
        write: Map<String, Value>,
    },
}

impl Accepted {
    /// The record key.
    pub fn key(&self) -> &str {
        match self {
            Self::Builtin(w) => &w.key,
            Self::Custom { key, .. } => key,
        }
    }

    /// The write as the JSON text queued for the processor (the `payload` the
    /// apply implementation gets).
    pub fn payload(&self) -> String {
        match self {
            Self::Builtin(w) => serde_json::to_string(w),
            Self::Custom { write, .. } => serde_json::to_string(write),
        }
        .unwrap_or_default()
    }
}

/// A request body: one write, or `{"writes": [...]}`.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteBatch {
    /// The writes, in request order.
    pub writes: Vec<Accepted>,
    /// When each write is due (`delay_ms`, `apply_at`) and when what it
    /// writes expires (`ttl_ms`), in the same order.
    pub timing: Vec<Timing>,
    /// Whether the request used the batch form.
    pub batch: bool,
}

/// [`parse_request_for`] with the built-in operations.
pub fn parse_request(body: &[u8], limits: &Limits) -> Result<WriteBatch, Problem> {
    parse_request_for(body, limits, &BUILTIN_OPS.map(String::from))
}

/// Parses and validates a request body for an apply implementation that declares
/// `operations`. Nothing is accepted unless every write is valid.
pub fn parse_request_for(body: &[u8], limits: &Limits, operations: &[String]) -> Result<WriteBatch, Problem> {
    if body.len() > limits.max_body_bytes {
        return Err(Problem::too_large(Some(body.len()), limits.max_body_bytes));
    }
    let json: Value = serde_json::from_slice(body).map_err(|e| Problem::malformed(&e.to_string()))?;
    if depth(&json) > limits.max_json_depth + 3 {
        return Err(Problem::invalid(&format!("the body nests more than {} levels", limits.max_json_depth + 3), ""));
    }
    let (writes, base): (Vec<Value>, &str) = match json {
        Value::Object(mut o) if o.contains_key("writes") => {
            if o.len() != 1 {
                return Err(Problem::invalid("a batch has only the member \"writes\"", ""));
            }
            match o.remove("writes") {
                Some(Value::Array(a)) => (a, "/writes"),
                _ => return Err(Problem::invalid("writes must be an array", "/writes")),
            }
        }
        v @ Value::Object(_) => (vec![v], ""),
        _ => return Err(Problem::invalid("the body must be a write object or {\"writes\": [...]}", "")),
    };
    if writes.is_empty() {
        return Err(Problem::invalid("a batch needs at least one write", "/writes"));
    }
    if writes.len() > limits.max_batch {
        return Err(Problem::invalid(
            &format!("a batch has {} writes; the limit is {}", writes.len(), limits.max_batch),
            "/writes",
        ));
    }
    let mut out = Vec::with_capacity(writes.len());
    let mut timing = Vec::with_capacity(writes.len());
    for (i, mut w) in writes.into_iter().enumerate() {
        let pointer = if base.is_empty() { String::new() } else { format!("{base}/{i}") };
        timing.push(take_timing(&mut w, &pointer)?);
        let custom = check_members(&w, &pointer, operations)?;
        let w = integral_numbers(w);
        if custom {
            out.push(custom_write(w, limits, &pointer)?);
            continue;
        }
        let write: Write = serde_json::from_value(w).map_err(|e| Problem::invalid(&e.to_string(), &pointer))?;
        write.validate(limits, &pointer)?;
        out.push(Accepted::Builtin(write));
    }
    Ok(WriteBatch { writes: out, timing, batch: !base.is_empty() })
}

/// Takes a write's timing members out of it (they are not part of what is
/// applied): `delay_ms` (an integer from 0) or `apply_at` (an RFC 3339 date or
/// an integer of milliseconds since the Unix epoch), not both; and `ttl_ms`
/// (an integer from 1; `put` and `merge` only). Whether the times are within
/// bounds is checked against the clock by intake ([`Timing::check`]).
fn take_timing(w: &mut Value, pointer: &str) -> Result<Timing, Problem> {
    let Value::Object(o) = w else { return Ok(Timing::default()) };
    let ttl_ms = match o.remove("ttl_ms") {
        None => None,
        Some(t) => {
            let at = format!("{pointer}/ttl_ms");
            if !matches!(o.get("op").and_then(Value::as_str), Some("put" | "merge")) {
                return Err(Problem::invalid("ttl_ms is for put and merge: what they write expires", &at));
            }
            match t.as_f64().filter(|f| f.fract() == 0.0 && *f >= 1.0 && *f <= MAX_INTEGER as f64) {
                Some(ms) => Some(ms as u64),
                None => return Err(Problem::invalid("ttl_ms must be an integer number of milliseconds from 1", &at)),
            }
        }
    };
    Ok(Timing { due: take_due(o, pointer)?, ttl_ms })
}

/// `delay_ms` or `apply_at` (see [`take_timing`]).
fn take_due(o: &mut Map<String, Value>, pointer: &str) -> Result<Option<Due>, Problem> {
    let (delay, at) = (o.remove("delay_ms"), o.remove("apply_at"));
    match (delay, at) {
        (None, None) => Ok(None),
        (Some(_), Some(_)) => Err(Problem::invalid("a write has delay_ms or apply_at, not both", &format!("{pointer}/apply_at"))),
        (Some(d), None) => match d.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= MAX_INTEGER as f64) {
            Some(ms) => Ok(Some(Due::After(ms as u64))),
            None => Err(Problem::invalid("delay_ms must be an integer number of milliseconds from 0", &format!("{pointer}/delay_ms"))),
        },
        (None, Some(a)) => {
            let ms = match &a {
                Value::String(t) => schedule::parse_rfc3339(t),
                Value::Number(n) => n.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= MAX_INTEGER as f64).map(|f| f as u64),
                _ => None,
            };
            match ms {
                Some(ms) => Ok(Some(Due::At(ms))),
                None => Err(Problem::invalid(
                    "apply_at must be an RFC 3339 date-time (e.g. 2026-12-03T17:00:00Z) or milliseconds since the Unix epoch",
                    &format!("{pointer}/apply_at"),
                )),
            }
        }
    }
}

/// A declared operation's write: its key checked, `if_version` (if any) a
/// version, and every other member within the value limits.
fn custom_write(w: Value, limits: &Limits, pointer: &str) -> Result<Accepted, Problem> {
    let Value::Object(write) = w else { unreachable!("check_members saw an object") };
    let key = match write.get("key") {
        Some(Value::String(k)) => k.clone(),
        _ => return Err(Problem::invalid("key must be a string", &format!("{pointer}/key"))),
    };
    check_key(&key, limits, &format!("{pointer}/key"))?;
    if write.get("if_version").is_some_and(|v| v.as_u64().is_none()) {
        return Err(Problem::invalid("if_version must be a version (an integer from 0)", &format!("{pointer}/if_version")));
    }
    let mut total = 0usize;
    for (name, v) in write.iter().filter(|(k, _)| !matches!(k.as_str(), "key" | "op" | "if_version")) {
        let at = format!("{pointer}/{}", pointer_token(name));
        let d = depth(v);
        if d > limits.max_json_depth {
            return Err(Problem::invalid(&format!("{name} nests {d} levels deep; the limit is {}", limits.max_json_depth), &at));
        }
        let size = serde_json::to_vec(v).map(|b| b.len()).unwrap_or(usize::MAX);
        if size > limits.max_value_bytes {
            return Err(Problem::invalid(&format!("{name} is {size} bytes; the limit is {}", limits.max_value_bytes), &at));
        }
        // The members together are held to the same limit as one value.
        total = total.saturating_add(size);
        if total > limits.max_value_bytes {
            return Err(Problem::invalid(
                &format!("the write's members are {total} bytes or more together; the limit is {}", limits.max_value_bytes),
                pointer,
            ));
        }
    }
    Ok(Accepted::Custom { key, write })
}

/// Members each op takes besides `key`, `op` and `if_version`, and which of them
/// are required. (serde cannot deny unknown fields through `flatten`, so members are
/// checked here, with a pointer to the one at fault.)
fn op_members(op: &str) -> Option<(&'static [&'static str], &'static [&'static str])> {
    Some(match op {
        "put" => (&["value"], &["value"]),
        "merge" => (&["patch"], &["patch"]),
        "incr" => (&["field", "by", "min", "max"], &["field"]),
        "append" => (&["field", "value", "max_len"], &["field", "value"]),
        "delete" => (&[], &[]),
        _ => return None,
    })
}

/// Members holding integers.
const INTEGER_MEMBERS: [&str; 5] = ["if_version", "by", "min", "max", "max_len"];

/// Largest magnitude of an integer member (within the 2^53 every JSON parser keeps).
pub const MAX_INTEGER: i64 = 9_000_000_000_000_000;

/// JSON has one number type: `87.0` is the integer 87 (as JSON Schema's `integer`
/// says), so integral floats of the integer members are read as integers.
fn integral_numbers(mut w: Value) -> Value {
    if let Value::Object(o) = &mut w {
        for name in INTEGER_MEMBERS {
            if let Some(Value::Number(n)) = o.get(name)
                && let Some(f) = n.as_f64().filter(|f| n.is_f64() && f.fract() == 0.0 && f.abs() <= MAX_INTEGER as f64) {
                    o.insert(name.to_owned(), Value::from(f as i64));
                }
        }
    }
    w
}

/// A JSON pointer token (RFC 6901): `~` as `~0`, `/` as `~1`.
fn pointer_token(name: &str) -> String {
    name.replace('~', "~0").replace('/', "~1")
}

/// Checks a write's members against its operation. Returns whether the
/// operation is a declared (not built-in) one, whose own members are left to
/// its implementation.
fn check_members(w: &Value, pointer: &str, operations: &[String]) -> Result<bool, Problem> {
    let Value::Object(o) = w else {
        return Err(Problem::invalid("a write must be a JSON object", pointer));
    };
    let expected = || match operations {
        [] => "no operation is declared".to_owned(),
        [one] => format!("expected {one}"),
        [init @ .., last] => format!("expected {} or {last}", init.join(", ")),
    };
    let op = match o.get("op") {
        Some(Value::String(op)) => op.as_str(),
        Some(_) => return Err(Problem::invalid("op must be a string", &format!("{pointer}/op"))),
        None => return Err(Problem::invalid(&format!("op is required ({})", expected()), &format!("{pointer}/op"))),
    };
    if !operations.iter().any(|d| d == op) {
        return Err(Problem::invalid(&format!("unknown op {op:?} ({})", expected()), &format!("{pointer}/op")));
    }
    let Some((allowed, required)) = op_members(op) else {
        if !o.contains_key("key") {
            return Err(Problem::invalid(&format!("key is required for op {op:?}"), &format!("{pointer}/key")));
        }
        return Ok(true);
    };
    if let Some(extra) = o.keys().find(|k| !matches!(k.as_str(), "key" | "op" | "if_version") && !allowed.contains(&k.as_str())) {
        return Err(Problem::invalid(&format!("unknown member {extra:?} for op {op:?}"), &format!("{pointer}/{}", pointer_token(extra))));
    }
    for name in INTEGER_MEMBERS {
        if let Some(v) = o.get(name) {
            let ok = v.as_f64().is_some_and(|f| f.fract() == 0.0 && f.abs() <= MAX_INTEGER as f64)
                && (v.is_f64() || v.as_i64().is_some_and(|i| i.abs() <= MAX_INTEGER));
            if !ok && !v.is_null() {
                return Err(Problem::invalid(
                    &format!("{name} must be an integer from -{MAX_INTEGER} to {MAX_INTEGER}"),
                    &format!("{pointer}/{name}"),
                ));
            }
        }
    }
    if let Some((name, _)) = o.iter().find(|(k, v)| v.is_null() && !matches!(k.as_str(), "value" | "patch")) {
        return Err(Problem::invalid(&format!("{name} must not be null"), &format!("{pointer}/{}", pointer_token(name))));
    }
    if let Some(missing) = ["key"].iter().chain(required).find(|m| !o.contains_key(**m)) {
        return Err(Problem::invalid(&format!("{missing} is required for op {op:?}"), &format!("{pointer}/{missing}")));
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<WriteBatch, Problem> {
        parse_request(v.to_string().as_bytes(), &Limits::default())
    }

    /// Every op parses, with defaults applied.
    #[test]
    fn parses_every_op() {
        let b = parse(json!({"writes": [
            {"key": "a", "op": "put", "value": {"x": 1}},
            {"key": "a", "op": "merge", "patch": {"x": null}},
            {"key": "a", "op": "incr", "field": "n"},
            {"key": "a", "op": "append", "field": "l", "value": 1, "max_len": 3},
            {"key": "a", "op": "delete", "if_version": 4}
        ]}))
        .unwrap();
        assert_eq!(b.writes.len(), 5);
        assert!(b.batch);
        let builtin = |i: usize| match &b.writes[i] {
            Accepted::Builtin(w) => w.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(builtin(2).op, Op::Incr { field: "n".into(), by: 1, min: None, max: None });
        assert_eq!(builtin(4).if_version, Some(4));
    }

    /// Invalid writes are refused with the field at fault.
    #[test]
    fn refuses_with_pointer() {
        let e = parse(json!({"writes": [{"key": "ok", "op": "delete"}, {"key": "a b", "op": "delete"}]})).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("/writes/1/key"));
        let ok = parse(json!({"key": "a", "op": "delete", "if_version": 3.0})).unwrap();
        assert!(matches!(&ok.writes[0], Accepted::Builtin(w) if w.if_version == Some(3)));
        let e = parse(json!({"key": "a", "op": "delete", "if_version": null})).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("/if_version"));
        let e = parse(json!({"key": "a", "op": "explode"})).unwrap_err();
        assert_eq!(e.status, 422);
        let e = parse(json!({"key": "x".repeat(300), "op": "delete"})).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("/key"));
        let e = parse_request(b"{nope", &Limits::default()).unwrap_err();
        assert_eq!(e.status, 400);
        let deep = (0..40).fold(json!(1), |v, _| json!([v]));
        let e = parse(json!({"key": "a", "op": "put", "value": deep})).unwrap_err();
        assert_eq!(e.status, 422);
    }

    /// `delay_ms` and `apply_at` are taken out of the write (not applied) and
    /// read; bad values name the member.
    #[test]
    fn scheduling_members() {
        let b = parse(json!({"writes": [
            {"key": "a", "op": "put", "value": 1, "delay_ms": 900_000},
            {"key": "a", "op": "delete", "apply_at": "2026-12-03T17:00:00Z"},
            {"key": "a", "op": "delete", "apply_at": 1_796_317_200_000u64},
            {"key": "a", "op": "incr", "field": "n", "delay_ms": 0.0},
            {"key": "a", "op": "delete"}
        ]}))
        .unwrap();
        let due: Vec<Option<Due>> = b.timing.iter().map(|t| t.due).collect();
        assert_eq!(due, [Some(Due::After(900_000)), Some(Due::At(1_796_317_200_000)), Some(Due::At(1_796_317_200_000)), Some(Due::After(0)), None]);
        assert!(!b.writes[0].payload().contains("delay_ms") && !b.writes[1].payload().contains("apply_at"), "{}", b.writes[0].payload());
        for (bad, at) in [
            (json!({"key": "a", "op": "delete", "delay_ms": -1}), "/delay_ms"),
            (json!({"key": "a", "op": "delete", "delay_ms": 1.5}), "/delay_ms"),
            (json!({"key": "a", "op": "delete", "delay_ms": "5"}), "/delay_ms"),
            (json!({"key": "a", "op": "delete", "apply_at": "tomorrow"}), "/apply_at"),
            (json!({"key": "a", "op": "delete", "apply_at": -5}), "/apply_at"),
            (json!({"key": "a", "op": "delete", "apply_at": 5, "delay_ms": 5}), "/apply_at"),
        ] {
            assert_eq!(parse(bad.clone()).unwrap_err().field.as_deref(), Some(at), "{bad}");
        }
        let custom = parse_request_for(json!({"key": "k", "op": "score", "points": 1, "delay_ms": 5}).to_string().as_bytes(), &Limits::default(), &["score".to_owned()]).unwrap();
        assert_eq!((custom.timing[0].due, custom.writes[0].payload().contains("delay_ms")), (Some(Due::After(5)), false));
        let ttl = parse(json!({"writes": [
            {"key": "a", "op": "put", "value": 1, "ttl_ms": 1000},
            {"key": "a", "op": "merge", "patch": {}, "ttl_ms": 5, "delay_ms": 10}
        ]}))
        .unwrap();
        assert_eq!(ttl.timing, [Timing { due: None, ttl_ms: Some(1000) }, Timing { due: Some(Due::After(10)), ttl_ms: Some(5) }]);
        assert!(!ttl.writes[0].payload().contains("ttl_ms"));
        for bad in [
            json!({"key": "a", "op": "put", "value": 1, "ttl_ms": 0}),
            json!({"key": "a", "op": "put", "value": 1, "ttl_ms": -5}),
            json!({"key": "a", "op": "put", "value": 1, "ttl_ms": "1s"}),
            json!({"key": "a", "op": "delete", "ttl_ms": 1000}),
            json!({"key": "a", "op": "incr", "field": "n", "ttl_ms": 1000}),
        ] {
            assert_eq!(parse(bad.clone()).unwrap_err().field.as_deref(), Some("/ttl_ms"), "{bad}");
        }
    }

    /// A declared operation is accepted with its members as sent (left to its
    /// implementation), its key and sizes still checked; a built-in operation the
    /// implementation does not declare is unknown.
    #[test]
    fn declared_operations() {
        let ops = ["score".to_owned(), "put".to_owned()];
        let parse = |v: Value| parse_request_for(v.to_string().as_bytes(), &Limits::default(), &ops);
        let b = parse(json!({"key": "board", "op": "score", "player": "ann", "points": 7.0, "if_version": 2})).unwrap();
        let Accepted::Custom { key, write } = &b.writes[0] else { panic!("{:?}", b.writes[0]) };
        assert_eq!(key, "board");
        assert_eq!(write["points"], json!(7.0));
        assert_eq!(b.writes[0].payload(), r#"{"if_version":2,"key":"board","op":"score","player":"ann","points":7.0}"#);
        assert!(matches!(&parse(json!({"key": "k", "op": "put", "value": 1})).unwrap().writes[0], Accepted::Builtin(_)));
        let e = parse(json!({"key": "k", "op": "incr", "field": "n"})).unwrap_err();
        assert_eq!((e.status, e.field.as_deref()), (422, Some("/op")));
        assert!(e.detail.contains("expected score or put"), "{}", e.detail);
        let e = parse(json!({"op": "score", "points": 1})).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("/key"));
        let e = parse(json!({"key": "a b", "op": "score"})).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("/key"));
        let e = parse(json!({"key": "k", "op": "score", "if_version": -1})).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("/if_version"));
        let e = parse(json!({"key": "k", "op": "score", "note": "x".repeat(70_000)})).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("/note"));
        let half = "x".repeat(40_000);
        let e = parse(json!({"key": "k", "op": "score", "a": half, "b": half})).unwrap_err();
        assert!(e.detail.contains("together"), "{}", e.detail);
    }
}
