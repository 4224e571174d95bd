//! The default implementation of `spillway:pipeline/apply` (`wit/pipeline.wit`,
//! `components/apply-builtin`) as a component: loaded in wasmtime, called through
//! the interface, it gives what the processor's built-in path gives.

use std::collections::{BTreeMap, HashSet};

use serde_json::{Value, json};
use spillway_core::apply::{Outcome as CoreOutcome, Record, canonical, plan_batch};
use spillway_core::write::Write;
use wasmtime::component::{Linker, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::support::fixture;

wasmtime::component::bindgen!({
    path: "../../wit",
    world: "spillway:pipeline/provider@0.1.0",
    exports: { default: async },
});

use exports::spillway::pipeline::apply::{Outcome, State, Write as WitWrite};

struct Host {
    table: ResourceTable,
    wasi: WasiCtx,
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// The component's outcomes for `writes` to key `k` (stored value `value` at
/// `version`), and the core batch plan's for the same, as comparable values.
async fn both(value: Option<Value>, version: u64, writes: &[Value]) -> (Vec<Result<Option<Value>, String>>, Vec<Result<Option<Value>, String>>) {
    let engine = spillway_testhost::engine::engine();
    let component = spillway_testhost::engine::load_component(std::path::Path::new(&fixture("apply_builtin"))).unwrap();
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).unwrap();
    let mut store = spillway_testhost::engine::new_store(Host { table: ResourceTable::new(), wasi: WasiCtx::builder().build() });
    let provider = Provider::instantiate_async(&mut store, &component, &linker).await.unwrap();
    let apply = provider.spillway_pipeline_apply();
    assert_eq!(apply.call_operations(&mut store).await.unwrap(), ["put", "merge", "incr", "append", "delete"]);
    let state = State { value: value.as_ref().map(|v| String::from_utf8(canonical(v)).unwrap()), version };
    let wit: Vec<WitWrite> = writes.iter().enumerate().map(|(i, w)| WitWrite { id: format!("3-{i}-0"), payload: w.to_string() }).collect();
    let got = apply.call_apply(&mut store, "k", &state, &wit, 1_000).await.unwrap().expect("no error");
    let got = got
        .into_iter()
        .map(|o| match o {
            Outcome::Applied(v) => Ok(v.map(|t| serde_json::from_str(&t).unwrap())),
            Outcome::Rejected(r) => Err(r),
        })
        .collect();

    let existing: BTreeMap<String, Record> = value.map(|value| ("k".to_owned(), Record { value, version, etag: String::new(), updated_at: 0 })).into_iter().collect();
    let tombstones = if existing.is_empty() { BTreeMap::from([("k".to_owned(), version)]) } else { BTreeMap::new() };
    let ids: Vec<(String, Write)> = writes
        .iter()
        .enumerate()
        .filter_map(|(i, w)| serde_json::from_value(w.clone()).ok().map(|w| (format!("3-{i}-0"), w)))
        .collect();
    let plan = plan_batch(existing, &tombstones, &ids, &HashSet::new(), 1_000);
    let want = plan
        .outcomes
        .into_iter()
        .map(|(_, _, o)| match o {
            CoreOutcome::Applied { value, .. } => Ok(value),
            CoreOutcome::Rejected { reason } => Err(reason),
        })
        .collect();
    (got, want)
}

/// Counters, bounds, lists, preconditions, a delete and a re-create (versions
/// carry on through it), on a stored record and on a key deleted at version 5:
/// the component's outcomes are the built-in path's, write by write.
#[tokio::test(flavor = "multi_thread")]
async fn builtin_component_applies_as_the_processor_does() {
    let writes = [
        json!({"key": "k", "op": "incr", "field": "n", "by": 3}),
        json!({"key": "k", "op": "incr", "field": "n", "by": -10, "min": 0}),
        json!({"key": "k", "op": "append", "field": "log", "value": {"x": 1}, "max_len": 1}),
        json!({"key": "k", "op": "append", "field": "log", "value": 2, "max_len": 1}),
        json!({"key": "k", "op": "merge", "patch": {"n": null, "tag": "b"}}),
        json!({"key": "k", "op": "delete", "if_version": 99}),
        json!({"key": "k", "op": "delete"}),
        json!({"key": "k", "op": "put", "value": [1, 2], "if_version": 10}),
    ];
    let (got, want) = both(Some(json!({"n": 1})), 6, &writes).await;
    assert_eq!(got, want);
    assert_eq!(got[0], Ok(Some(json!({"n": 4}))));
    assert!(got[1].as_ref().is_err_and(|r| r.contains("below the minimum 0")), "{:?}", got[1]);
    assert_eq!(got[6], Ok(None), "deleted");
    assert_eq!(got[7], Ok(Some(json!([1, 2]))), "re-created at version 10 (6 + 3 applied + the delete)");

    let (got, want) = both(None, 5, &[json!({"key": "k", "op": "put", "value": 1, "if_version": 5})]).await;
    assert_eq!((got.clone(), got), (want, vec![Ok(Some(json!(1)))]));
}

/// A write the component cannot read, or one for another key, is that write's
/// rejection; the others are applied around it.
#[tokio::test(flavor = "multi_thread")]
async fn unreadable_writes_are_rejected_alone() {
    let writes = [
        json!({"key": "k", "op": "incr", "field": "n"}),
        json!({"key": "k", "op": "teleport"}),
        json!({"key": "other", "op": "incr", "field": "n"}),
        json!({"key": "k", "op": "incr", "field": "n"}),
    ];
    let (got, _) = both(None, 0, &writes).await;
    assert_eq!(got[0], Ok(Some(json!({"n": 1}))));
    assert!(got[1].as_ref().is_err_and(|r| r.starts_with("unreadable write")), "{:?}", got[1]);
    assert!(got[2].as_ref().is_err_and(|r| r.contains("not \"k\"")), "{:?}", got[2]);
    assert_eq!(got[3], Ok(Some(json!({"n": 2}))));
}
