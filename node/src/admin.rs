//! The admin HTTP API, served on loopback only.
//!
//! - `GET /v1/status`: this node (id, name, address, upstream ports).
//! - `GET /v1/peers`: members with `node_id`, `name`, `addr`, `state` (alive | suspect | down).
//! - `GET /v1/services`: the overlay-wide catalog, `name` and `node_id` per row.
//! - `GET /metrics`: Prometheus text.

use std::future::Future;
use std::net::SocketAddr;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use overlay::identity::NodeIdStr;
use overlay::Node;
use serde::Serialize;
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

/// The admin router for `node`.
pub fn router(node: Node) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/peers", get(peers))
        .route("/v1/services", get(services))
        .route("/metrics", get(metrics))
        .with_state(node)
}

/// Serves the admin API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    node: Node,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(node))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn status(State(node): State<Node>) -> Json<Status> {
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

async fn peers(State(node): State<Node>) -> impl IntoResponse {
    Json(node.peers().await)
}

async fn services(State(node): State<Node>) -> impl IntoResponse {
    Json(node.services())
}

async fn metrics(State(node): State<Node>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        node.render_metrics(),
    )
}
