//! The apply step (`spillway:pipeline/apply@0.1.0`, `wit/pipeline.wit`) as this
//! component imports it: Spin composes the component with the implementation the
//! manifest names in `[component.<id>.dependencies]` (the built-in operations by
//! default).

use serde_json::Value;
use spillway_core::apply::{StepResult, StepWrites, canonical};

mod bindings {
    #![allow(missing_docs, unreachable_pub)]
    wit_bindgen::generate!({
        path: "../../wit",
        world: "spillway:pipeline/consumer@0.1.0",
        generate_all,
    });
}

use bindings::spillway::pipeline::apply as step;

thread_local! {
    static OPERATIONS: std::cell::OnceCell<&'static [String]> = const { std::cell::OnceCell::new() };
}

/// The operations the implementation declares: asked once per instance (the
/// list is fixed) and kept for the instance's life, so a request costs no copy.
pub fn operations() -> &'static [String] {
    OPERATIONS.with(|o| *o.get_or_init(|| Vec::leak(step::operations())))
}

/// One call of the step for `key`: its value (`None`: absent) at `version`, and
/// its writes in order. Values cross as JSON text; an applied value that is not
/// JSON fails the call, as the step's own error does.
pub fn apply(key: &str, value: Option<&Value>, version: u64, writes: &StepWrites<'_>, now_ms: i64) -> StepResult {
    let current = step::State { value: value.map(|v| String::from_utf8(canonical(v)).unwrap_or_default()), version };
    let writes: Vec<step::Write> = writes.iter().map(|(id, payload)| step::Write { id: (*id).to_owned(), payload: (*payload).to_owned() }).collect();
    step::apply(key, &current, &writes, now_ms)?
        .into_iter()
        .map(|o| match o {
            step::Outcome::Applied(None) => Ok(Ok(None)),
            step::Outcome::Applied(Some(text)) => serde_json::from_str(&text)
                .map(|v| Ok(Some(v)))
                .map_err(|e| format!("the apply step returned a value for {key:?} that is not JSON: {e}")),
            step::Outcome::Rejected(reason) => Ok(Err(reason)),
        })
        .collect()
}
