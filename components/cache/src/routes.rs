//! Routing: which handler answers which path and method.

use spillway_core::problem::Problem;
use spillway_core::query::Query;
use spillway_spin::{answer, authorize, problem};
use spin_sdk::http::BoxBody;

use crate::{admin, changes, read, records, status};

/// The OpenAPI 3.1 document of the whole API (kept in `api/openapi.json`).
const OPENAPI: &str = include_str!("../../../api/openapi.json");

pub(crate) async fn handle(req: spin_sdk::http::Request) -> http::Response<BoxBody> {
    let path = req.uri().path().to_owned();
    if req.method() == http::Method::GET
        && let Some(raw_key) = path.strip_prefix("/v1/records/").and_then(|p| p.strip_suffix("/changes"))
    {
        return match changes::feed(raw_key, req.headers()).await {
            Ok(r) => r,
            Err(p) => full(problem(&p)),
        };
    }
    full(handle_full(req).await)
}

/// A response whose body is all there.
fn full(r: http::Response<String>) -> http::Response<BoxBody> {
    r.map(spin_sdk::http::box_body)
}

async fn handle_full(req: spin_sdk::http::Request) -> http::Response<String> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    if path == "/v1/openapi.json" {
        if method != http::Method::GET {
            return spillway_spin::method_not_allowed("GET");
        }
        return spillway_spin::respond(200, "application/json", OPENAPI.to_owned(), &[]);
    }
    let (allow, route) = if path == "/v1/records:get" {
        ("POST", Route::Records)
    } else if path.starts_with("/v1/records/") {
        ("GET", Route::Record)
    } else if path.starts_with("/v1/writes/") {
        ("GET, DELETE", Route::Write)
    } else if path.starts_with("/v1/cache/") {
        ("PUT, DELETE", Route::Cache)
    } else {
        return problem(&Problem::not_found(&format!("no resource at {path}")));
    };
    if !allow.split(", ").any(|m| m == method.as_str()) {
        return spillway_spin::method_not_allowed(allow);
    }
    let settings = match spillway_spin::settings().await {
        Ok(s) => s,
        Err(p) => return problem(&p),
    };
    let query = req.uri().query().map(str::to_owned);
    let waits = asked_wait_ms(&route, query.as_deref());
    let result = spillway_spin::deadline::request(&settings, waits, async {
        match route {
        Route::Record => read::record(&settings, &path["/v1/records/".len()..], query.as_deref(), req.headers()).await,
        Route::Records => records::get_many(&settings, req, query.as_deref()).await,
        Route::Write if method == http::Method::DELETE => status::cancel(&settings, &path["/v1/writes/".len()..]).await,
        Route::Write => status::write_status(&settings, &path["/v1/writes/".len()..], query.as_deref()).await,
        Route::Cache => match authorize(req.headers(), settings.admin_token.as_deref()) {
            Ok(()) => admin::cache_admin(&settings, &path["/v1/cache/".len()..], method == http::Method::DELETE).await,
            Err(p) => Err(p),
        },
        }
    })
    .await;
    answer(result)
}

/// How long a request asks to wait (beyond its deadline): `wait` on a write's
/// status, or on a read at `min_version` (which waits 5 s unless told). A
/// value that does not parse is refused by the handler; it adds nothing here.
fn asked_wait_ms(route: &Route, query: Option<&str>) -> u64 {
    let Ok(q) = Query::parse(query, &["consistent", "min_version", "wait"]) else { return 0 };
    let wait = q.get("wait").and_then(spillway_spin::status::wait_secs);
    match route {
        Route::Write => wait.unwrap_or(0),
        Route::Record if q.get("min_version").is_some() => wait.unwrap_or(read::MIN_VERSION_WAIT_MS),
        _ => 0,
    }
}

enum Route {
    Record,
    Records,
    Write,
    Cache,
}
