//! End-to-end: predictive pre-authentication and the safety of early data, on real peers.
//!
//! Each test runs a provider with a counting echo backend and a client whose engine is set
//! up for the test. Assertions are on counters (handshakes, backend connections, replays),
//! never on time.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshd_suite::*;
use netsim::link::LinkSpec;
use netsim::mem::MemNet;
use netsim::net::{peer_addr, SimNet};
use netsim::topology::LatencyModel;
use overlay::preauth::{Policy, PreauthConfig, Served};
use overlay::{Node, NodeConfig, ServiceConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::timeout;

const BOUND: Duration = Duration::from_secs(20);

/// A TCP echo backend that counts connections accepted and open, and records each request.
#[derive(Clone)]
struct Backend {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Backend {
    async fn start() -> Backend {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let b = Backend {
            addr: l.local_addr().unwrap(),
            accepted: Arc::default(),
            open: Arc::default(),
            requests: Arc::default(),
        };
        let bb = b.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                bb.accepted.fetch_add(1, Ordering::SeqCst);
                bb.open.fetch_add(1, Ordering::SeqCst);
                let bb = bb.clone();
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                req.extend_from_slice(&buf[..n]);
                                if s.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    if !req.is_empty() {
                        bb.requests.lock().unwrap().push(req);
                    }
                    bb.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        b
    }

    fn requests(&self) -> Vec<Vec<u8>> {
        self.requests.lock().unwrap().clone()
    }
}

fn engine(policy: Policy, budget: usize) -> PreauthConfig {
    PreauthConfig {
        policy,
        budget,
        // Loopback RTTs are tiny: make every prediction worth preparing.
        handshake_cost_ms: 0.0,
        hold_cost_ms: 0.0,
        ..PreauthConfig::default()
    }
}

/// Where the two peers talk.
#[derive(Clone, Copy)]
enum Net<'a> {
    /// Real UDP on loopback.
    Loopback,
    /// In-memory, immediate (capture and inject).
    Mem(&'a MemNet),
    /// Simulated links with latency (in real time here).
    Sim(&'a SimNet),
}

/// A provider publishing `services` (all on `backend`) and a client; both joined, the client
/// knowing every service.
async fn pair(
    net: Net<'_>,
    backend: &Backend,
    services: &[&str],
    server: impl FnOnce(&mut NodeConfig),
    client: impl FnOnce(&mut NodeConfig),
) -> (Node, Node) {
    let ca = test_ca();
    let start = |name: &'static str, cfg: NodeConfig| {
        let id = identity(&ca, name);
        async move {
            let i = usize::from(name != "provider");
            match net {
                Net::Mem(net) => Node::spawn(net.bind(peer_addr(i)), id, cfg).await.unwrap(),
                Net::Sim(net) => Node::spawn(net.bind(i, peer_addr(i)), id, cfg)
                    .await
                    .unwrap(),
                Net::Loopback => Node::bind("127.0.0.1:0".parse().unwrap(), id, cfg)
                    .await
                    .unwrap(),
            }
        }
    };
    let mut scfg = config(&[], 1);
    scfg.services = services
        .iter()
        .map(|s| ServiceConfig {
            name: (*s).into(),
            backend: backend.addr,
        })
        .collect();
    server(&mut scfg);
    let p = start("provider", scfg).await;
    let mut ccfg = config(&[p.addr()], 2);
    client(&mut ccfg);
    let c = start("client", ccfg).await;
    let n = services.len();
    timeout(BOUND, async {
        c.wait_members(|m| m == 1).await;
        p.wait_members(|m| m == 1).await;
        c.wait_catalog(|e| e.iter().filter(|s| s.node_id.0 == p.node_id()).count() == n)
            .await;
    })
    .await
    .expect("peers join and the catalog converges");
    (p, c)
}

/// One request of `app` for `service`: sends `payload`, reads the echo.
async fn ask(node: &Node, app: &str, service: &str, payload: &[u8]) -> Result<Served, String> {
    let s = timeout(BOUND, node.open_for(app, service))
        .await
        .map_err(|_| "open timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let served = s.served;
    let (mut send, mut recv, lease) = (s.send, s.recv, s.lease);
    send.write_all(payload).await.map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    let back = timeout(BOUND, recv.read_to_end(1 << 20))
        .await
        .map_err(|_| "read timed out".to_string())?
        .map_err(|e| e.to_string())?;
    drop(lease);
    if back != payload {
        return Err(format!("echo mismatch: {} bytes back", back.len()));
    }
    Ok(served)
}

fn pool(node: &Node, what: &str) -> u64 {
    node.preauth_view()["pool"][what].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predicted_request_is_served_warm_without_a_handshake() {
    let backend = Backend::start().await;
    let (p, c) = pair(
        Net::Loopback,
        &backend,
        &["echo"],
        |_| {},
        |cfg| cfg.preauth.engine = Some(engine(Policy::Predictive, 2)),
    )
    .await;
    assert_eq!(
        ask(&c, "app", "echo", b"first").await.unwrap(),
        Served::Cold
    );
    // The engine predicts the next "echo" and keeps its path warm.
    wait_until("a warm path", BOUND, || pool(&c, "warm_connections") >= 1).await;
    let (hc, hp) = (
        c.stats().snapshot().handshakes,
        p.stats().snapshot().handshakes,
    );
    for i in 0..5 {
        let served = ask(&c, "app", "echo", format!("again {i}").as_bytes())
            .await
            .unwrap();
        assert!(
            matches!(served, Served::Stream | Served::Connection),
            "request {i} took {served:?}"
        );
    }
    assert_eq!(
        c.stats().snapshot().handshakes,
        hc,
        "client paid no handshake"
    );
    assert_eq!(
        p.stats().snapshot().handshakes,
        hp,
        "provider paid no handshake"
    );
    let s = c.stats().snapshot();
    assert_eq!(s.preauth_hits_stream + s.preauth_hits_connection, 5);
    assert_eq!(s.preauth_misses, 1);
    let view = c.preauth_view();
    let warm = view["clients"]["app"].as_array().unwrap();
    assert!(warm.iter().any(|w| w["service"] == "echo"), "{view}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_zero_rtt_first_flight_is_not_executed_twice() {
    let net = MemNet::new();
    let backend = Backend::start().await;
    let idempotent = |cfg: &mut NodeConfig| {
        cfg.preauth.idempotent = ["echo".to_string()].into_iter().collect();
    };
    let (p, c) = pair(Net::Mem(&net), &backend, &["echo"], idempotent, |cfg| {
        idempotent(cfg);
        // Nothing kept warm: the second request resumes in 0-RTT.
        cfg.preauth.engine = Some(engine(Policy::Off, 0));
    })
    .await;
    assert_eq!(ask(&c, "app", "echo", b"one").await.unwrap(), Served::Cold);
    let settled = p.quic_connections();
    net.start_capture(c.addr(), p.addr());
    assert_eq!(
        ask(&c, "app", "echo", b"two").await.unwrap(),
        Served::Ticket
    );
    let flight = net.take_capture();
    assert!(!flight.is_empty());
    // Once the provider has forgotten that connection (closed and drained), an attacker
    // replays everything the client sent for it, twice.
    wait_until("the 0-RTT connection drained", BOUND, || {
        p.quic_connections() <= settled
    })
    .await;
    for _ in 0..2 {
        for d in &flight {
            net.inject(c.addr(), p.addr(), d);
        }
    }
    // A later request goes through the same queue after the replayed packets.
    assert_eq!(
        ask(&c, "app", "echo", b"three").await.unwrap(),
        Served::Ticket
    );
    let reqs = backend.requests();
    assert_eq!(
        reqs.iter().filter(|r| r.as_slice() == b"two").count(),
        1,
        "the 0-RTT request ran exactly once: {reqs:?}"
    );
    assert_eq!(backend.accepted.load(Ordering::SeqCst), 3);
    assert!(c.stats().snapshot().zero_rtt_connections >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_peers_ticket_is_refused() {
    let backend = Backend::start().await;
    let idempotent = |cfg: &mut NodeConfig| {
        cfg.preauth.idempotent = ["echo".to_string()].into_iter().collect();
    };
    let (p, c) = pair(Net::Loopback, &backend, &["echo"], idempotent, |cfg| {
        idempotent(cfg);
        cfg.preauth.engine = Some(engine(Policy::Off, 0));
    })
    .await;
    assert_eq!(
        ask(&c, "app", "echo", b"before").await.unwrap(),
        Served::Cold
    );
    // The client holds a ticket; the provider now denies it.
    p.deny_set().deny_node(c.node_id());
    let refused0 = p.stats().snapshot().connections_refused;
    let r = ask(&c, "app", "echo", b"after").await;
    assert!(
        r.is_err(),
        "a revoked peer's 0-RTT request must fail: {r:?}"
    );
    assert!(p.stats().snapshot().connections_refused > refused0);
    assert!(
        !backend.requests().iter().any(|q| q.as_slice() == b"after"),
        "nothing from the revoked peer reached the backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_idempotent_requests_never_ride_in_zero_rtt() {
    let backend = Backend::start().await;
    // The client does not mark "pay" idempotent: it never sends it early.
    let (_p, c) = pair(
        Net::Loopback,
        &backend,
        &["pay"],
        |_| {},
        |cfg| cfg.preauth.engine = Some(engine(Policy::Off, 0)),
    )
    .await;
    for i in 0..3 {
        let served = ask(&c, "app", "pay", format!("pay {i}").as_bytes())
            .await
            .unwrap();
        assert_eq!(served, Served::Cold);
    }
    assert_eq!(c.stats().snapshot().zero_rtt_connections, 0);

    // A client that (wrongly) thinks "pay" is idempotent sends it early: the provider, which
    // does not, holds it until the handshake completes, then serves it once. On a 40 ms link
    // the early stream arrives a round trip before the handshake can complete.
    let backend = Backend::start().await;
    let net = SimNet::new(LatencyModel::uniform(2, 40.0), LinkSpec::default(), 7);
    let (p, c) = pair(
        Net::Sim(&net),
        &backend,
        &["pay"],
        |_| {},
        |cfg| {
            cfg.preauth.idempotent = ["pay".to_string()].into_iter().collect();
            cfg.preauth.engine = Some(engine(Policy::Off, 0));
        },
    )
    .await;
    assert_eq!(ask(&c, "app", "pay", b"p1").await.unwrap(), Served::Cold);
    assert_eq!(ask(&c, "app", "pay", b"p2").await.unwrap(), Served::Ticket);
    assert_eq!(p.stats().snapshot().early_data_held, 1);
    assert_eq!(backend.requests().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unused_preopened_stream_is_closed_and_backend_released() {
    let backend = Backend::start().await;
    let (p, c) = pair(
        Net::Loopback,
        &backend,
        &["echo"],
        |_| {},
        |cfg| {
            cfg.preauth.engine = Some(PreauthConfig {
                stream_deadline: Duration::from_millis(300),
                // Keep the entry (and its connection) longer than the stream.
                entry_ttl: Duration::from_secs(60),
                ..engine(Policy::Hinted, 1)
            })
        },
    )
    .await;
    c.preauth_hint("app", vec!["echo".into()]);
    wait_until("a pre-opened stream", BOUND, || {
        pool(&c, "preopened_streams") == 1 && backend.open.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(p.stats().snapshot().preopened_inbound, 1);
    // Nobody uses it: past its deadline it is reset and the provider drops the backend.
    wait_until("the backend released", BOUND, || {
        backend.open.load(Ordering::SeqCst) == 0
    })
    .await;
    assert_eq!(pool(&c, "preopened_streams"), 0, "{}", c.preauth_view());
    assert!(c.stats().snapshot().preauth_streams_expired >= 1);
    wait_until("the provider's count", BOUND, || {
        p.stats().snapshot().preopened_inbound == 0
    })
    .await;
    assert!(
        backend.requests().is_empty(),
        "no request was ever sent on it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_caps_hold_under_a_client_that_requests_everything() {
    let backend = Backend::start().await;
    let names: Vec<String> = (0..12).map(|i| format!("s{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let (_p, c) = pair(
        Net::Loopback,
        &backend,
        &refs,
        |_| {},
        |cfg| {
            cfg.preauth.engine = Some(PreauthConfig {
                max_warm_connections: 2,
                max_preopened_streams: 1,
                ..engine(Policy::Recent, 3)
            })
        },
    )
    .await;
    for round in 0..3 {
        for s in &names {
            ask(&c, "greedy", s, format!("{round} {s}").as_bytes())
                .await
                .unwrap();
            let view = c.preauth_view();
            let warm = view["clients"]["greedy"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            assert!(warm.len() <= 3, "budget per client: {view}");
            let deep = warm
                .iter()
                .filter(|w| w["level"] == "connection" || w["level"] == "stream")
                .count();
            assert!(deep <= 2, "warm connections cap: {view}");
            assert!(pool(&c, "preopened_streams") <= 1);
        }
    }
    assert_eq!(backend.requests().len(), 36);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predicted_request_to_a_token_service_finds_its_token_ready() {
    let backend = Backend::start().await;
    let (p, c) = pair(
        Net::Loopback,
        &backend,
        &["secure"],
        |cfg| {
            let policy = overlay::auth::policy::Policy {
                require_token: true,
                ..Default::default()
            };
            cfg.auth.service_policies.insert("secure".into(), policy);
        },
        |cfg| cfg.preauth.engine = Some(engine(Policy::Predictive, 2)),
    )
    .await;
    // Without a key the service refuses the stream.
    assert!(ask(&c, "app", "secure", b"no key").await.is_err());
    let (_, key) = p.create_api_key("secure").await.unwrap();
    c.set_upstream_key("secure", key);
    assert!(ask(&c, "app", "secure", b"first").await.is_ok());
    wait_until("a warm path with its token", BOUND, || {
        pool(&c, "warm_connections") >= 1 && c.stats().snapshot().preauth_tokens_prefetched >= 1
    })
    .await;
    let issued = p.stats().snapshot().tokens_issued;
    let hs = c.stats().snapshot().handshakes;
    for i in 0..3 {
        let served = ask(&c, "app", "secure", format!("warm {i}").as_bytes())
            .await
            .unwrap();
        assert!(
            matches!(served, Served::Stream | Served::Connection),
            "{served:?}"
        );
    }
    assert_eq!(
        p.stats().snapshot().tokens_issued,
        issued,
        "no token round trip"
    );
    assert_eq!(c.stats().snapshot().handshakes, hs, "no handshake");
    assert_eq!(backend.requests().len(), 4);
}
