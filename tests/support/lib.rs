//! Shared harness for the end-to-end tests in `tests/` and the benchmarks in `benches/`:
//! an in-memory overlay CA, node identities, fast membership timings, and TCP echo backends.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::time::Duration;

use overlay::identity::{generate_ca, CaMaterial, Validity};
use overlay::membership::MembershipConfig;
use overlay::{Node, NodeConfig, NodeIdentity, ServiceConfig, UpstreamConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A fresh overlay CA valid for a year.
pub fn test_ca() -> CaMaterial {
    generate_ca("test", Validity::days_from(now(), 365).unwrap()).unwrap()
}

/// Wall-clock now (test code only).
pub fn now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// A node identity issued by `ca`.
pub fn identity(ca: &CaMaterial, name: &str) -> NodeIdentity {
    NodeIdentity::issue(ca, name, Validity::days_from(now(), 90).unwrap()).unwrap()
}

/// Membership timings for tests: probe every 100 ms, down after 1 s of suspicion.
pub fn fast_membership() -> MembershipConfig {
    MembershipConfig {
        probe_period: Duration::from_millis(100),
        probe_rtt: Duration::from_millis(50),
        suspect_to_down: Duration::from_secs(1),
        ..MembershipConfig::default()
    }
}

/// A node config with fast membership, joining through `bootstrap`.
pub fn config(bootstrap: &[SocketAddr], seed: u64) -> NodeConfig {
    NodeConfig {
        bootstrap: bootstrap.to_vec(),
        membership: fast_membership(),
        seed,
        max_join_backoff: Duration::from_secs(1),
        ..NodeConfig::default()
    }
}

/// Builder-ish helper: spawns a node on loopback UDP.
pub async fn spawn(
    ca: &CaMaterial,
    name: &str,
    bootstrap: &[SocketAddr],
    services: Vec<ServiceConfig>,
    upstreams: Vec<UpstreamConfig>,
) -> Node {
    let mut cfg = config(bootstrap, name.len() as u64);
    cfg.services = services;
    cfg.upstreams = upstreams;
    Node::bind("127.0.0.1:0".parse().unwrap(), identity(ca, name), cfg)
        .await
        .unwrap()
}

/// A TCP echo server on loopback; returns its address.
pub async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// An address on which nothing listens (a refused backend).
pub async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
    // dropped here: the port is closed
}

/// Sends `data` through `addr`, half-closes, and reads everything back.
pub async fn echo_through(addr: SocketAddr, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let (mut r, mut w) = s.split();
    let write = async {
        w.write_all(data).await?;
        w.shutdown().await
    };
    let mut out = Vec::with_capacity(data.len());
    let read = r.read_to_end(&mut out);
    let (wr, rd) = tokio::join!(write, read);
    wr?;
    rd?;
    Ok(out)
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) as u8
        })
        .collect()
}

/// Installs a test log subscriber honouring RUST_LOG (once per process).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A bare quinn client endpoint presenting `identity` (its own CA list decides whom it trusts).
pub fn raw_client(identity: &NodeIdentity) -> (quinn::Endpoint, quinn::ClientConfig) {
    let tls = overlay::tls::client_config(identity, Default::default()).unwrap();
    raw_client_with(tls)
}

/// A bare quinn client endpoint with a given rustls config.
pub fn raw_client_with(tls: rustls::ClientConfig) -> (quinn::Endpoint, quinn::ClientConfig) {
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let cfg = quinn::ClientConfig::new(std::sync::Arc::new(quic));
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    (ep, cfg)
}

/// Waits until `cond` holds, re-checking every few milliseconds; panics after `limit`.
/// For conditions with no event to wait on (counters on another peer).
pub async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Spawns a node on loopback UDP after letting `f` adjust its config (auth settings etc.).
pub async fn spawn_with(
    ca: &CaMaterial,
    identity: NodeIdentity,
    bootstrap: &[SocketAddr],
    f: impl FnOnce(&mut NodeConfig),
) -> Node {
    let _ = ca;
    let mut cfg = config(bootstrap, identity.info.name.len() as u64);
    f(&mut cfg);
    Node::bind("127.0.0.1:0".parse().unwrap(), identity, cfg)
        .await
        .unwrap()
}

/// A node identity issued by `ca` with groups.
pub fn identity_in_groups(ca: &CaMaterial, name: &str, groups: &[&str]) -> NodeIdentity {
    let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
    let n = overlay::identity::issue_node_with_groups(
        ca,
        name,
        &groups,
        Validity::days_from(now(), 90).unwrap(),
    )
    .unwrap();
    NodeIdentity::from_pem(&ca.cert_pem, &n.cert_pem, &n.key_pem).unwrap()
}
