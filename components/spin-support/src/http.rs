//! HTTP: responses that always carry `Content-Length`, problem answers, the
//! admin token, request ids and bounded body reads.

use std::cell::RefCell;

use spillway_core::problem::Problem;
use subtle::ConstantTimeEq as _;

/// A response with a known body: `Content-Length` is always set (see DESIGN.md).
pub fn respond(status: u16, content_type: &str, body: String, headers: &[(&str, String)]) -> http::Response<String> {
    let mut b = http::Response::builder()
        .status(status)
        .header("content-length", body.len());
    if !body.is_empty() {
        b = b.header("content-type", content_type);
    }
    for (k, v) in headers {
        b = b.header(*k, v.as_str());
    }
    b.body(body).unwrap_or_else(|_| {
        http::Response::builder().status(500).header("content-length", 0).body(String::new()).expect("static")
    })
}

/// A JSON response.
pub fn json(status: u16, value: &serde_json::Value, headers: &[(&str, String)]) -> http::Response<String> {
    respond(status, "application/json", value.to_string(), headers)
}

/// An `application/problem+json` response.
pub fn problem(p: &Problem) -> http::Response<String> {
    let mut headers = Vec::new();
    if let Some(s) = p.retry_after {
        headers.push(("retry-after", s.to_string()));
    }
    respond(p.status, "application/problem+json", p.body(), &headers)
}

/// A handler's result as the answer: the response, or its problem.
pub fn answer(result: Result<http::Response<String>, Problem>) -> http::Response<String> {
    result.unwrap_or_else(|p| problem(&p))
}

/// 405 with `Allow`.
pub fn method_not_allowed(allow: &str) -> http::Response<String> {
    let p = Problem::new(405, "method-not-allowed", "Method not allowed", &format!("allowed: {allow}"));
    respond(405, "application/problem+json", p.body(), &[("allow", allow.to_owned())])
}

/// Checks `Authorization: Bearer <token>` in constant time; admin endpoints are
/// disabled (403) when no token is configured.
pub fn authorize(headers: &http::HeaderMap, token: Option<&str>) -> Result<(), Problem> {
    let Some(token) = token else {
        return Err(Problem::unauthorized(403, "admin endpoints are disabled: no admin_token is configured"));
    };
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| Problem::unauthorized(401, "missing Authorization: Bearer <token>"))?;
    // `subtle`: no early exit, the time depends on the lengths only.
    if bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
        Ok(())
    } else {
        Err(Problem::unauthorized(403, "the token is not valid"))
    }
}

thread_local! {
    /// This instance's random id prefix and its request counter.
    static REQUEST_IDS: RefCell<Option<(String, u64)>> = const { RefCell::new(None) };
}

/// The request id: the client's `X-Request-Id` when it is 1 to 128 characters of
/// `A-Z a-z 0-9 . _ -`, else a new one: 24 random hex digits drawn once per
/// instance and a counter, so a reused instance makes one call for randomness, not
/// one per request.
pub fn request_id(headers: &http::HeaderMap) -> String {
    if let Some(id) = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')))
    {
        return id.to_owned();
    }
    REQUEST_IDS.with_borrow_mut(|ids| {
        let (prefix, n) = ids.get_or_insert_with(|| (crate::clock::token()[..24].to_owned(), 0));
        *n += 1;
        format!("{prefix}{:08x}", *n)
    })
}

/// Adds the request id to a response.
pub fn with_request_id<B>(mut res: http::Response<B>, id: &str) -> http::Response<B> {
    if let Ok(v) = http::HeaderValue::from_str(id) {
        res.headers_mut().insert("x-request-id", v);
    }
    res
}

/// A response with the request id, handed over as [`hand_over`] does.
pub async fn finish<B>(res: http::Response<B>, id: &str) -> spin_sdk::wasip3::http::types::Response
where
    B: http_body::Body + Unpin + 'static,
    B::Data: Into<Vec<u8>>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
{
    hand_over(with_request_id(res, id)).await
}

/// A response as the host takes it, handed over so that a server can send
/// it in one piece.
///
/// Spin's HTTP server sends a response's headers as soon as it is handed
/// over and, when its body is not there to read at that moment, sends the
/// body later as a packet of its own, which Nagle's algorithm holds until the
/// client acknowledges the headers (a delayed ACK: 40 ms). The SDK writes a
/// body from a task of the component's own that runs only after the handler
/// has returned. Here that task has issued its first write (of the body's
/// first frame, if it is ready) before the response is handed over, so the
/// server finds the body waiting when it reads. A response with an empty
/// body is handed over with no body stream at all (`contents: none`).
pub async fn hand_over<B>(res: http::Response<B>) -> spin_sdk::wasip3::http::types::Response
where
    B: http_body::Body + Unpin + 'static,
    B::Data: Into<Vec<u8>>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
{
    use spin_sdk::wasip3::http::types::{ErrorCode, Fields, Response, Trailers};
    let (parts, mut body) = res.into_parts();
    let Ok(headers) = Fields::try_from(parts.headers) else { return unreachable_response() };
    let (response, _) = if body.size_hint().exact() == Some(0) {
        // No trailers: the future's writer is dropped, which resolves it to
        // its default, `Ok(None)`.
        let (_, trailers) = spin_sdk::wasip3::wit_future::new::<Result<Option<Trailers>, ErrorCode>>(|| Ok(None));
        Response::new(headers, None, trailers)
    } else {
        let (writer, contents, trailers) = spin_sdk::wasip3::http_compat::BodyWriter::new();
        let started = std::rc::Rc::new(std::cell::Cell::new(false));
        let turned = started.clone();
        spin_sdk::wit_bindgen::spawn(async move {
            let mut send = std::pin::pin!(writer.send_http_body(&mut body));
            let first = futures::poll!(send.as_mut());
            turned.set(true);
            if first.is_pending() {
                let _ = send.await;
            }
        });
        while !started.get() {
            spin_sdk::wit_bindgen::yield_async().await;
        }
        Response::new(headers, Some(contents), trailers)
    };
    let _ = response.set_status_code(parts.status.as_u16());
    response
}

/// A bare 500, for a response that could not be converted (its parts come
/// from this crate and are valid, so this is not expected).
fn unreachable_response() -> spin_sdk::wasip3::http::types::Response {
    use spin_sdk::http::IntoResponse as _;
    spin_sdk::http::StatusCode::INTERNAL_SERVER_ERROR.into_response().expect("a bare status converts")
}

/// Reads a request body, refusing (413) as soon as it passes `limit` bytes, whether
/// or not the client sent `Content-Length`: an oversized body is never buffered.
pub async fn read_body(req: spin_sdk::http::Request, limit: usize) -> Result<Vec<u8>, Problem> {
    use http_body_util::BodyExt as _;
    let declared = req
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(len) = declared.filter(|len| *len > limit) {
        return Err(Problem::too_large(Some(len), limit));
    }
    match http_body_util::Limited::new(req.into_body(), limit).collect().await {
        Ok(c) => Ok(c.to_bytes().to_vec()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(Problem::too_large(None, limit)),
        Err(e) => Err(Problem::malformed(&format!("the body could not be read: {e}"))),
    }
}

