//! What every admin request passes before a handler sees it, and what every error looks like
//! after: the bearer token (mutating routes always when one is set, reads when
//! `admin.api.require.auth.for.reads`), no unauthenticated changes on a non-loopback address,
//! `Content-Type: application/json` and a bounded, well-formed JSON body on mutating routes, and
//! one JSON error shape (`{"error": "...", "status": N}`) for every 4xx/5xx, axum's own included.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};

use super::error;

/// Largest request body a mutating route reads; the admin API's bodies are a few hundred bytes.
pub const BODY_BYTES_MAX: usize = 64 * 1024;

/// Largest non-JSON error body (axum's rejections are one line) turned into a JSON message.
const ERROR_TEXT_MAX: usize = 4096;

/// Who may do what on this admin listener.
#[derive(Clone)]
pub struct Access {
    /// SHA-256 of the token: comparing digests of equal length in constant time leaks neither
    /// the token's bytes nor its length through timing.
    token_digest: Option<[u8; 32]>,
    require_auth_for_reads: bool,
    /// The listener is reachable from other hosts (not a loopback address).
    exposed: bool,
}

impl Access {
    pub fn new(token: Option<&str>, require_auth_for_reads: bool, exposed: bool) -> Access {
        Access {
            token_digest: token.map(digest),
            require_auth_for_reads,
            exposed,
        }
    }

    /// Changes are refused outright: reachable from other hosts and no token to check.
    pub fn open_to_the_network(&self) -> bool {
        self.exposed && self.token_digest.is_none()
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(want) = &self.token_digest else {
            return true;
        };
        let Some(given) = bearer(headers) else {
            return false;
        };
        constant_time_eq(&digest(given), want)
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Equal-length comparison whose time does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive, RFC 6750).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// GET and HEAD read; everything else (POST, PUT, DELETE, PATCH, ...) is treated as a change,
/// so a method added later is guarded by default.
fn is_mutating(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD)
}

/// `application/json`, parameters (`; charset=utf-8`) allowed. A cross-site HTML form can only
/// send `application/x-www-form-urlencoded`, `multipart/form-data` or `text/plain` without a
/// CORS preflight, so requiring this refuses such "simple" requests before anything changes.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

fn unauthorized(message: &str) -> Response {
    let mut resp = error(StatusCode::UNAUTHORIZED, message);
    resp.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

/// The middleware every route and the fallback run behind.
pub async fn guard(State(access): State<Arc<Access>>, req: Request, next: Next) -> Response {
    let mutating = is_mutating(req.method());
    if (mutating || access.require_auth_for_reads) && !access.authorized(req.headers()) {
        let why = if bearer(req.headers()).is_some() {
            "invalid bearer token"
        } else {
            "this request needs an 'Authorization: Bearer <token>' header with the admin token"
        };
        return unauthorized(why);
    }
    let req = if mutating {
        if access.open_to_the_network() {
            return error(
                StatusCode::FORBIDDEN,
                "changes through the admin API are refused: it listens on an address other hosts \
                 can reach and no token is set; start the node with --admin-token-file FILE (or \
                 admin.api.token / admin.api.token.file) and send 'Authorization: Bearer <token>'",
            );
        }
        if !is_json(req.headers()) {
            return error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "this request needs 'Content-Type: application/json' (a body-less request may send \
                 an empty body or {})",
            );
        }
        match checked_body(req).await {
            Ok(req) => req,
            Err(resp) => return resp,
        }
    } else {
        req
    };
    json_errors(next.run(req).await).await
}

/// Reads a mutating request's body (at most [`BODY_BYTES_MAX`]) and checks it is empty or one
/// JSON value, so every handler gets a bounded body and malformed JSON is one 400 everywhere.
async fn checked_body(req: Request) -> Result<Request, Response> {
    use futures::StreamExt;
    let (parts, body) = req.into_parts();
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body larger than {BODY_BYTES_MAX} bytes"),
        )
    };
    // A declared length over the limit is refused before a byte of the body is read.
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > BODY_BYTES_MAX as u64) {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}"),
            )
        })?;
        if bytes.len() + chunk.len() > BODY_BYTES_MAX {
            return Err(too_large());
        }
        bytes.extend_from_slice(&chunk);
    }
    if !bytes.iter().all(u8::is_ascii_whitespace) {
        if let Err(e) = serde_json::from_slice::<serde_json::Value>(&bytes) {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!("bad JSON body: {e}"),
            ));
        }
    }
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

/// Turns an error response that is not JSON (axum's 405, extractor rejections, ...) into the
/// one error shape, keeping its status and headers (`Allow` on a 405).
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) || is_json(resp.headers()) {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, ERROR_TEXT_MAX)
        .await
        .ok()
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| {
            status
                .canonical_reason()
                .unwrap_or("request failed")
                .to_ascii_lowercase()
        });
    let fresh = error(status, text);
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::CONTENT_TYPE);
    let (fresh_parts, fresh_body) = fresh.into_parts();
    parts.headers.extend(fresh_parts.headers);
    Response::from_parts(parts, fresh_body)
}

/// A handler's optional JSON body: empty means the type's default; the error is the message
/// of a 400.
pub fn optional_body<T: serde::de::DeserializeOwned + Default>(body: &Bytes) -> Result<T, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| format!("bad request body: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn bearer_tokens_are_compared_whole() {
        let a = Access::new(Some("tok-1"), false, false);
        assert!(a.authorized(&headers(&[("authorization", "Bearer tok-1")])));
        assert!(a.authorized(&headers(&[("authorization", "bearer  tok-1 ")])));
        for bad in [
            "Bearer tok-",
            "Bearer tok-12",
            "Basic tok-1",
            "tok-1",
            "Bearer ",
        ] {
            assert!(!a.authorized(&headers(&[("authorization", bad)])), "{bad}");
        }
        assert!(!a.authorized(&HeaderMap::new()));
        // No token configured: nothing to check.
        assert!(Access::new(None, false, false).authorized(&HeaderMap::new()));
    }

    #[test]
    fn only_a_loopback_listener_serves_changes_without_a_token() {
        assert!(!Access::new(None, false, false).open_to_the_network());
        assert!(Access::new(None, false, true).open_to_the_network());
        assert!(!Access::new(Some("t"), false, true).open_to_the_network());
    }

    #[test]
    fn only_application_json_is_json() {
        assert!(is_json(&headers(&[("content-type", "application/json")])));
        assert!(is_json(&headers(&[(
            "content-type",
            "Application/JSON; charset=utf-8"
        )])));
        for other in [
            "application/x-www-form-urlencoded",
            "text/plain",
            "multipart/form-data; boundary=x",
            "application/jsonx",
        ] {
            assert!(!is_json(&headers(&[("content-type", other)])), "{other}");
        }
        assert!(!is_json(&HeaderMap::new()));
        assert!(is_mutating(&Method::POST) && is_mutating(&Method::DELETE));
        assert!(!is_mutating(&Method::GET) && !is_mutating(&Method::HEAD));
    }
}
