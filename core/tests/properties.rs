//! Property tests of parsing and validation: hostile input never panics, and nothing
//! that validation should refuse is ever accepted.

use proptest::prelude::*;
use serde_json::{Value, json};
use spillway_core::apply::apply;
use spillway_core::layout::{Layout, decode_key, encode_key};
use spillway_core::write::{Accepted, Limits, Op, Write, depth, parse_request};

const LIMITS: Limits = Limits { max_body_bytes: 4096, max_batch: 4, max_key_len: 12, max_value_bytes: 64, max_json_depth: 3 };

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        "[ -~é\u{0}-\u{1f}{}*:]{0,8}".prop_map(Value::from),
    ];
    leaf.prop_recursive(6, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map("[a-z_/~]{0,6}", inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn write_like() -> impl Strategy<Value = Value> {
    (
        "[ -~é\u{0}-\u{1f}\u{85}{}*:]{0,16}",
        prop::sample::select(vec!["put", "merge", "incr", "append", "delete", "explode", ""]),
        json_value(),
        prop::option::of(any::<i64>()),
        prop::option::of(any::<i64>()),
        prop::option::of("[a-z]{0,3}"),
        any::<bool>(),
    )
        .prop_map(|(key, op, value, by, min, field, extra)| {
            let mut w = json!({"key": key, "op": op});
            match op {
                "put" | "append" => w["value"] = value,
                "merge" => w["patch"] = value,
                _ => {}
            }
            if let Some(f) = field {
                w["field"] = json!(f);
            }
            if let Some(b) = by {
                w["by"] = json!(b);
            }
            if let Some(m) = min {
                w["min"] = json!(m);
            }
            if extra {
                w["surprise"] = json!(1);
            }
            w
        })
}

fn assert_valid(w: &Accepted) {
    let Accepted::Builtin(w) = w else { panic!("only built-in operations are declared: {w:?}") };
    assert_valid_write(w);
}

fn assert_valid_write(w: &Write) {
    assert!(!w.key.is_empty() && w.key.chars().count() <= LIMITS.max_key_len, "{w:?}");
    assert!(w.key.chars().all(|c| if c.is_ascii() { c.is_ascii_graphic() } else { !c.is_control() }), "{w:?}");
    let v = match &w.op {
        Op::Put { value } | Op::Append { value, .. } => Some(value),
        Op::Merge { patch } => Some(patch),
        _ => None,
    };
    if let Some(v) = v {
        assert!(depth(v) <= LIMITS.max_json_depth, "{w:?}");
        assert!(serde_json::to_vec(v).unwrap().len() <= LIMITS.max_value_bytes, "{w:?}");
    }
    if let Op::Incr { field, .. } | Op::Append { field, .. } = &w.op {
        assert!(!field.is_empty());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Arbitrary bytes never panic and are either refused with a 4xx or valid.
    #[test]
    fn arbitrary_bytes(body in prop::collection::vec(any::<u8>(), 0..512)) {
        match parse_request(&body, &LIMITS) {
            Ok(b) => b.writes.iter().for_each(assert_valid),
            Err(p) => prop_assert!((400..500).contains(&p.status)),
        }
    }

    /// Write-shaped JSON (single and batched) is accepted only when every write is
    /// valid; refusals are 4xx with a problem type.
    #[test]
    fn write_shaped_json(writes in prop::collection::vec(write_like(), 1..6), batch in any::<bool>()) {
        let body = if batch || writes.len() > 1 { json!({"writes": writes}) } else { writes[0].clone() };
        match parse_request(body.to_string().as_bytes(), &LIMITS) {
            Ok(b) => {
                prop_assert!(b.writes.len() <= LIMITS.max_batch);
                b.writes.iter().for_each(assert_valid);
            }
            Err(p) => {
                prop_assert!((400..500).contains(&p.status));
                prop_assert!(p.kind.starts_with("https://spillway.dev/problems/"));
            }
        }
    }

    /// Applying any accepted write to any record never panics.
    #[test]
    fn apply_never_panics(w in write_like(), current in prop::option::of(json_value())) {
        if let Ok(b) = parse_request(w.to_string().as_bytes(), &LIMITS) {
            let record = current.map(|value| spillway_core::apply::Record { etag: String::new(), value, version: 3, updated_at: 0 });
            if let Accepted::Builtin(w) = &b.writes[0] {
                let _ = apply(record.as_ref(), w, 0);
            }
        }
    }

    /// Encoded keys are injective and only use safe characters; shards are in range.
    #[test]
    fn key_encoding(a in "\\PC{0,12}", b in "\\PC{0,12}") {
        let ea = encode_key(&a);
        prop_assert!(ea.bytes().all(|c| c.is_ascii_alphanumeric() || b"-._~%".contains(&c)));
        prop_assert_eq!(ea == encode_key(&b), a == b);
        prop_assert_eq!(decode_key(&ea), Some(a.clone()));
        let l = Layout { prefix: "spillway:".into(), shards: 7 };
        prop_assert!(l.shard_of(&a) < 7);
    }
}
