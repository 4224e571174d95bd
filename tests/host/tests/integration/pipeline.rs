use serde_json::json;

use crate::spillway::{ADMIN, Spillway};

/// A write accepted with 202 is applied and then readable, and its status says
/// applied with the resulting version.
#[tokio::test(flavor = "multi_thread")]
async fn accepted_write_is_applied_and_readable() {
    let s = Spillway::start(&[], true).await;
    let (status, v) = s.write(json!({"key": "user:1", "op": "put", "value": {"name": "Ada"}})).await;
    assert_eq!(status, 202, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    assert_eq!(v["status_url"], format!("/v1/writes/{id}"));
    let st = s.settled(&id).await;
    assert_eq!(st, json!({"id": id, "status": "applied", "version": 1, "key": "user:1"}));
    let (code, headers, rec) = s.call("GET", "/v1/records/user%3A1", None, &[]).await;
    assert_eq!(code, 200, "{rec}");
    assert_eq!(rec["value"], json!({"name": "Ada"}));
    assert_eq!(rec["version"], 1);
    let etag = headers["etag"].to_str().unwrap().to_owned();
    assert_eq!(etag, format!("\"{}\"", spillway_core::apply::etag(&json!({"name": "Ada"}))));
    let (code, _, _) = s.call("GET", "/v1/records/user%3A1", None, &[("if-none-match", &etag)]).await;
    assert_eq!(code, 304);
    let (code, _, drained) = s.call("POST", "/v1/drain", None, &[("authorization", &format!("Bearer {ADMIN}"))]).await;
    assert_eq!(code, 200, "{drained}");
}
