//! The admin HTTP API, served on loopback only.
//!
//! Read-only, unauthenticated (loopback):
//! - `GET /v1/status`: this node (id, name, address, upstream ports).
//! - `GET /v1/peers`: members with `node_id`, `name`, `addr`, `state` (alive | suspect | down).
//! - `GET /v1/services`: the overlay-wide catalog, `name` and `node_id` per row.
//! - `GET /v1/jwks`: this node's token verification keys (RFC 7517).
//! - `GET /v1/preauth`: pre-authentication: each local client's warm set (service, level,
//!   probability, expiry), the warm pool and the engine's counters.
//! - `GET /v1/routes`: routing: this node's network coordinate and, per member, the measured
//!   link (RTT, loss, down), the RTT estimate, the reported load, the cheapest path and the
//!   path in use (hysteresis).
//! - `GET /metrics`: Prometheus text.
//!
//! Authenticated by the credential they carry:
//! - `GET /v1/services/{name}` (`Authorization: Bearer <api key or token>`): discovery.
//! - `POST /v1/tokens` `{service, api_key, scope}` → `{token, expires_at}`; 401/403/404/429.
//! - `POST /v1/tokens/verify` `{token}` → claims, or 401.
//!
//! Mutating, `Authorization: Bearer <admin token>` (the token in `state_dir/admin.token`):
//! - `POST /v1/services` `{name, backend, policy?}` → `{service, key_id, api_key}` (201).
//! - `DELETE /v1/services/{name}` → deregistration report.
//! - `POST /v1/services/{name}/keys` → `{key_id, api_key}` (201; the key is shown once).
//! - `DELETE /v1/services/{name}/keys/{key_id}[?overlap_secs=N]` → `{key_id, not_after}`.
//! - `POST /v1/revocations` `{node_id | serial | jti | key_id | record, reason?}`.
//! - `POST /v1/signing-keys/rotate` → `{kid}`.
//! - `GET /v1/backup` → the credential store (secrets!); `POST /v1/restore` with one.
//!
//! Errors are `{"error": "...", "status": N}` (+ `retry_after_ms` and a `Retry-After` header
//! on 429). Request bodies are limited to 1 MiB (8 MiB for restore).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use overlay::auth::keys::KeyId;
use overlay::auth::policy::Policy;
use overlay::auth::revocation::SignedRevocation;
use overlay::auth::secret::SecretString;
use overlay::auth::store::StoreFile;
use overlay::auth::AdminError;
use overlay::identity::NodeIdStr;
use overlay::node::RevokeRequest;
use overlay::wire::Refused;
use overlay::Node;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

/// `GET /v1/status` body.
#[derive(Serialize)]
pub struct Status {
    /// Node id.
    pub node_id: NodeIdStr,
    /// Name.
    pub name: String,
    /// Address peers dial.
    pub addr: SocketAddr,
    /// Local forwarding ports.
    pub upstreams: Vec<UpstreamView>,
}

/// A local forwarding port.
#[derive(Serialize)]
pub struct UpstreamView {
    /// Service.
    pub service: String,
    /// Listening address.
    pub listen: SocketAddr,
}

#[derive(Clone)]
struct AppState {
    node: Node,
    admin_token: Option<Arc<SecretString>>,
}

/// The admin router for `node`; mutating calls need `admin_token` (refused if None).
pub fn router(node: Node, admin_token: Option<SecretString>) -> Router {
    let state = AppState {
        node,
        admin_token: admin_token.map(Arc::new),
    };
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/peers", get(peers))
        .route("/v1/services", get(services).post(register))
        .route("/v1/services/{name}", get(discover).delete(deregister))
        .route("/v1/services/{name}/keys", post(create_key))
        .route("/v1/services/{name}/keys/{key_id}", delete(retire_key))
        .route("/v1/tokens", post(issue_token))
        .route("/v1/tokens/verify", post(verify_token))
        .route("/v1/jwks", get(jwks))
        .route("/v1/preauth", get(preauth))
        .route("/v1/routes", get(routes))
        .route("/v1/revocations", post(revoke))
        .route("/v1/signing-keys/rotate", post(rotate))
        .route("/v1/backup", get(backup))
        .route(
            "/v1/restore",
            post(restore).layer(DefaultBodyLimit::max(8 << 20)),
        )
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(1 << 20))
        .with_state(state)
}

/// Serves the admin API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    node: Node,
    admin_token: Option<SecretString>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(node, admin_token))
        .with_graceful_shutdown(shutdown)
        .await
}

#[derive(Serialize)]
struct ErrorBody {
    error: String,
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_ms: Option<u64>,
}

fn error(status: u16, msg: impl Into<String>, retry_after_ms: Option<u64>) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = Json(ErrorBody {
        error: msg.into(),
        status,
        retry_after_ms,
    });
    match retry_after_ms {
        Some(ms) => (
            code,
            [(header::RETRY_AFTER, ms.div_ceil(1000).max(1).to_string())],
            body,
        )
            .into_response(),
        None => (code, body).into_response(),
    }
}

fn refused(r: Refused) -> Response {
    error(r.status, r.reason, r.retry_after_ms)
}

fn admin_error(e: AdminError) -> Response {
    let status = match &e {
        AdminError::Exists(_) => 409,
        AdminError::NoService(_) | AdminError::NoKey(_) => 404,
        AdminError::Invalid(_) => 400,
        AdminError::Full(_) => 507,
        _ => 500,
    };
    error(status, e.to_string(), None)
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Refuses unless the request carries the admin token (compared in constant time).
#[allow(clippy::result_large_err)] // the error is the HTTP response itself, built once
fn require_admin(state: &AppState, headers: &HeaderMap) -> Result<(), Response> {
    let Some(expected) = &state.admin_token else {
        return Err(error(403, "admin token not configured on this node", None));
    };
    match bearer(headers) {
        Some(t) if expected.ct_eq_str(t) => Ok(()),
        Some(_) => Err(error(401, "wrong admin token", None)),
        None => Err(error(
            401,
            "missing Authorization: Bearer <admin token>",
            None,
        )),
    }
}

async fn status(State(s): State<AppState>) -> Json<Status> {
    let node = s.node;
    Json(Status {
        node_id: NodeIdStr(node.node_id()),
        name: node.name().to_owned(),
        addr: node.addr(),
        upstreams: node
            .upstream_addrs()
            .into_iter()
            .map(|(service, listen)| UpstreamView { service, listen })
            .collect(),
    })
}

async fn peers(State(s): State<AppState>) -> impl IntoResponse {
    Json(s.node.peers().await)
}

async fn services(State(s): State<AppState>) -> impl IntoResponse {
    Json(s.node.services())
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.node.render_metrics(),
    )
}

async fn jwks(State(s): State<AppState>) -> impl IntoResponse {
    Json(s.node.jwks())
}

/// Pre-authentication: each local client's warm set (service, level, probability, expiry),
/// the pool and the engine's counters. Read-only; shows no secret (tokens are never listed).
async fn routes(State(s): State<AppState>) -> impl IntoResponse {
    Json(s.node.routes_view())
}

async fn preauth(State(s): State<AppState>) -> impl IntoResponse {
    Json(s.node.preauth_view())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    name: String,
    backend: SocketAddr,
    #[serde(default)]
    policy: Option<Policy>,
}

async fn register(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Json<RegisterBody>,
) -> Response {
    if let Err(r) = require_admin(&s, &headers) {
        return r;
    }
    let Json(b) = body;
    match s.node.register_service(&b.name, b.backend, b.policy).await {
        Ok(r) => (StatusCode::CREATED, Json(r)).into_response(),
        Err(e) => admin_error(e),
    }
}

async fn deregister(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    if let Err(r) = require_admin(&s, &headers) {
        return r;
    }
    match s.node.deregister_service(&name).await {
        Ok(report) => Json(report).into_response(),
        Err(e) => admin_error(e),
    }
}

#[derive(Serialize)]
struct Discovery {
    service: String,
    instances: Vec<overlay::wire::Instance>,
}

async fn discover(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    let Some(cred) = bearer(&headers) else {
        return error(
            401,
            "missing Authorization: Bearer <api key or token>",
            None,
        );
    };
    match s.node.discover(&name, cred).await {
        Ok(instances) => Json(Discovery {
            service: name,
            instances,
        })
        .into_response(),
        Err(r) => refused(r),
    }
}

#[derive(Serialize)]
struct NewKey {
    key_id: String,
    api_key: SecretString,
}

async fn create_key(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    if let Err(r) = require_admin(&s, &headers) {
        return r;
    }
    match s.node.create_api_key(&name).await {
        Ok((key_id, api_key)) => (
            StatusCode::CREATED,
            Json(NewKey {
                key_id: key_id.to_string(),
                api_key,
            }),
        )
            .into_response(),
        Err(e) => admin_error(e),
    }
}

#[derive(Deserialize)]
struct RetireQuery {
    overlap_secs: Option<u64>,
}

async fn retire_key(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path((name, key_id)): Path<(String, String)>,
    Query(q): Query<RetireQuery>,
) -> Response {
    if let Err(r) = require_admin(&s, &headers) {
        return r;
    }
    let key_id: KeyId = match key_id.parse() {
        Ok(k) => k,
        Err(e) => return error(400, e, None),
    };
    match s.node.retire_api_key(&name, &key_id, q.overlap_secs).await {
        Ok(not_after) => Json(serde_json::json!({
            "key_id": key_id.to_string(),
            "not_after": not_after,
        }))
        .into_response(),
        Err(e) => admin_error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    service: String,
    api_key: SecretString,
    #[serde(default = "default_scope")]
    scope: String,
}

fn default_scope() -> String {
    overlay::auth::policy::SCOPE_CONNECT.to_owned()
}

#[derive(Serialize)]
struct TokenResponse {
    token: SecretString,
    expires_at: u64,
}

async fn issue_token(State(s): State<AppState>, body: Json<TokenBody>) -> Response {
    let Json(b) = body;
    if !overlay::identity::valid_name(&b.service) || !overlay::identity::valid_name(&b.scope) {
        return error(400, "invalid service or scope name", None);
    }
    match s
        .node
        .request_token(&b.service, b.api_key.expose(), &b.scope)
        .await
    {
        Ok(g) => Json(TokenResponse {
            token: g.token,
            expires_at: g.expires_at,
        })
        .into_response(),
        Err(r) => refused(r),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyBody {
    token: SecretString,
}

async fn verify_token(State(s): State<AppState>, body: Json<VerifyBody>) -> Response {
    match s.node.verify_token(body.0.token.expose()) {
        Ok(claims) => Json(claims).into_response(),
        Err(r) => error(401, r.to_string(), None),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    node_id: Option<String>,
    serial: Option<String>,
    jti: Option<String>,
    key_id: Option<String>,
    /// A pre-signed node or serial revocation (text form, from `meshd revoke`).
    record: Option<String>,
    #[serde(default)]
    reason: String,
}

async fn revoke(State(s): State<AppState>, headers: HeaderMap, body: Json<RevokeBody>) -> Response {
    if let Err(r) = require_admin(&s, &headers) {
        return r;
    }
    let Json(b) = body;
    let given = [
        b.node_id.is_some(),
        b.serial.is_some(),
        b.jti.is_some(),
        b.key_id.is_some(),
        b.record.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if given != 1 {
        return error(
            400,
            "give exactly one of node_id, serial, jti, key_id, record",
            None,
        );
    }
    let req = if let Some(id) = b.node_id {
        match id.parse() {
            Ok(id) => RevokeRequest::Node(id),
            Err(e) => return error(400, format!("{e}"), None),
        }
    } else if let Some(serial) = b.serial {
        RevokeRequest::Serial(serial)
    } else if let Some(jti) = b.jti {
        RevokeRequest::Jti(jti)
    } else if let Some(k) = b.key_id {
        match k.parse() {
            Ok(k) => RevokeRequest::KeyId(k),
            Err(e) => return error(400, e, None),
        }
    } else if let Some(rec) = b.record {
        match SignedRevocation::from_text(&rec) {
            Ok(r) => RevokeRequest::Signed(r),
            Err(e) => return error(400, e.to_string(), None),
        }
    } else {
        return error(400, "nothing to revoke", None);
    };
    match s.node.revoke(req, &b.reason).await {
        Ok(msg) => Json(serde_json::json!({ "revoked": msg })).into_response(),
        Err(e) => admin_error(e),
    }
}

async fn rotate(State(s): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(r) = require_admin(&s, &headers) {
        return r;
    }
    match s.node.rotate_signing_key().await {
        Ok(kid) => Json(serde_json::json!({ "kid": kid })).into_response(),
        Err(e) => admin_error(e),
    }
}

async fn backup(State(s): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(r) = require_admin(&s, &headers) {
        return r;
    }
    Json(s.node.credential_store()).into_response()
}

async fn restore(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = require_admin(&s, &headers) {
        return r;
    }
    let backup: StoreFile =
        match overlay::auth::store::parse(std::path::Path::new("request body"), &body) {
            Ok(b) => b,
            Err(e) => return error(400, e.to_string(), None),
        };
    match s.node.restore_credentials(&backup).await {
        Ok(()) => Json(serde_json::json!({ "restored": true })).into_response(),
        Err(e) => admin_error(e),
    }
}
