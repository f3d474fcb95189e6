//! End-to-end: routing around a cut link through a relay, end-to-end encryption through the
//! relay, tamper detection, relay path checks. Real peers on a simulated network (real time).
//!
//! Waits are on conditions (the router's own view), never on time alone.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshd_suite::*;
use netsim::link::LinkSpec;
use netsim::net::{peer_addr, SimNet};
use netsim::topology::LatencyModel;
use overlay::identity::NodeId;
use overlay::routing::{Direction, RelayTap};
use overlay::wire::{self, code, StreamHeader, StreamKind};
use overlay::{Node, ServiceConfig};
use tokio::io::AsyncReadExt;

const BOUND: Duration = Duration::from_secs(30);

/// a (0), b (1), c (2) on 10 ms links; a–c cut both ways. c publishes "echo"; b relays, with
/// `tap` on what it relays.
async fn triangle(tap: Option<RelayTap>) -> (SimNet, Node, Node, Node) {
    triangle_with(tap, |_| {}).await
}

async fn triangle_with(
    tap: Option<RelayTap>,
    a_cfg: impl FnOnce(&mut overlay::NodeConfig),
) -> (SimNet, Node, Node, Node) {
    let net = SimNet::new(LatencyModel::uniform(3, 10.0), LinkSpec::default(), 11);
    net.partition(&[0], &[2], true);
    let ca = test_ca();
    let echo = echo_server().await;
    let mut bcfg = config(&[], 1);
    bcfg.routing.relay_tap = tap;
    let b = Node::spawn(net.bind(1, peer_addr(1)), identity(&ca, "b"), bcfg)
        .await
        .unwrap();
    let mut ccfg = config(&[b.addr()], 2);
    ccfg.services = vec![ServiceConfig {
        name: "echo".into(),
        backend: echo,
    }];
    let c = Node::spawn(net.bind(2, peer_addr(2)), identity(&ca, "c"), ccfg)
        .await
        .unwrap();
    let mut acfg = config(&[b.addr()], 3);
    a_cfg(&mut acfg);
    let a = Node::spawn(net.bind(0, peer_addr(0)), identity(&ca, "a"), acfg)
        .await
        .unwrap();
    a.wait_catalog(|s| s.iter().any(|e| e.name == "echo")).await;
    (net, a, b, c)
}

/// The relays of `a`'s current best path to `to`, once it has one through a relay.
fn relays_to(a: &Node, to: NodeId) -> Option<Vec<String>> {
    let v = a.routes_view();
    let peer = v["peers"]
        .as_array()?
        .iter()
        .find(|p| p["node_id"].as_str() == Some(&to.to_string()))?
        .clone();
    let via: Vec<String> = peer["best"]["via"]
        .as_array()?
        .iter()
        .filter_map(|x| x.as_str().map(str::to_owned))
        .collect();
    (!via.is_empty() && peer["link_down"].as_bool() == Some(true)).then_some(via)
}

async fn read_all(ex: overlay::node::Exchange) -> Vec<u8> {
    let mut out = ex.first.clone();
    let mut io = ex.io;
    let _ = tokio::time::timeout(BOUND, io.read_to_end(&mut out)).await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_is_routed_around_through_a_relay_that_sees_only_ciphertext() {
    let seen: Arc<Mutex<Vec<u8>>> = Arc::default();
    let s = seen.clone();
    let tap = RelayTap(Arc::new(move |_dir: Direction, bytes: &mut Vec<u8>| {
        s.lock().unwrap().extend_from_slice(bytes)
    }));
    let (_net, a, b, c) = triangle(Some(tap)).await;
    wait_until("a routes to c through b", BOUND, || {
        relays_to(&a, c.node_id()) == Some(vec![b.node_id().to_string()])
    })
    .await;

    let marker = b"MARKER-plaintext-never-seen-by-relays-0123456789".repeat(4);
    let ex = a
        .exchange("echo", &marker, true)
        .await
        .expect("relayed exchange");
    let last = ex.attempts.last().unwrap().clone();
    assert_eq!(last.provider, c.node_id());
    assert_eq!(last.relays, vec![b.node_id()]);
    assert_eq!(read_all(ex).await, marker, "echo through the relay");

    let relayed = seen.lock().unwrap().clone();
    assert!(
        relayed.len() > marker.len(),
        "the relay carried the exchange"
    );
    assert!(
        !relayed.windows(16).any(|w| w == &marker[..16]),
        "plaintext visible to the relay"
    );
    assert_eq!(b.stats().snapshot().relayed_streams, 1);
    assert_eq!(c.stats().snapshot().e2e_streams_served, 1);
    assert_eq!(a.stats().snapshot().relayed_streams_opened, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_flips_bytes_is_detected_by_the_destination() {
    // Flip one bit in every chunk towards the destination after the first (the ClientHello):
    // handshake messages and records alike fail TLS's authentication.
    let chunks = Arc::new(Mutex::new(0usize));
    let n = chunks.clone();
    let tap = RelayTap(Arc::new(move |dir: Direction, bytes: &mut Vec<u8>| {
        if dir == Direction::Forward {
            let mut n = n.lock().unwrap();
            *n += 1;
            if *n > 1 {
                if let Some(x) = bytes.last_mut() {
                    *x ^= 0x01;
                }
            }
        }
    }));
    let (_net, a, b, c) = triangle(Some(tap)).await;
    wait_until("a routes to c through b", BOUND, || {
        relays_to(&a, c.node_id()) == Some(vec![b.node_id().to_string()])
    })
    .await;
    let marker = b"integrity-marker".repeat(8);
    match a.exchange("echo", &marker, true).await {
        // Nothing altered may come back as an answer.
        Ok(ex) => assert_ne!(read_all(ex).await, marker),
        Err(e) => assert!(!e.attempts.is_empty()),
    }
    wait_until("c detects the tampering", BOUND, || {
        c.stats().snapshot().e2e_refused >= 1
    })
    .await;
    assert_eq!(
        c.stats().snapshot().e2e_streams_served,
        0,
        "no tampered stream served"
    );
    assert!(*chunks.lock().unwrap() > 1);
}

/// Opens a raw stream to `node` as `identity` with `kind` and returns the reset code.
async fn reset_code(node: &Node, identity: &overlay::NodeIdentity, kind: StreamKind) -> u64 {
    let (ep, cfg) = raw_client(identity);
    let conn = ep
        .connect_with(
            cfg,
            node.addr(),
            &overlay::tls::server_name_for(Some(node.node_id())),
        )
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let header = wire::encode_header(&StreamHeader {
        kind,
        request_id: 1,
    });
    send.write_all(&header).await.unwrap();
    let mut buf = [0u8; 1];
    match recv.read(&mut buf).await {
        Err(quinn::ReadError::Reset(c)) => c.into_inner(),
        other => panic!("expected a reset, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_refuse_loops_long_paths_and_forged_previous_hops() {
    let ca = test_ca();
    let node = spawn(&ca, "relay", &[], vec![], vec![]).await;
    let me = identity(&ca, "origin");
    let far = identity(&ca, "far").node_id();
    let other = identity(&ca, "other").node_id();
    let (r, o) = (node.node_id(), me.node_id());
    // Back through the relay itself.
    let kind = StreamKind::Relay {
        route: vec![far],
        visited: vec![r, o],
    };
    assert_eq!(
        reset_code(&node, &me, kind).await,
        u64::from(code::ROUTING_LOOP)
    );
    // Three more relays where two are allowed in all.
    let kind = StreamKind::Relay {
        route: vec![
            other,
            identity(&ca, "x").node_id(),
            identity(&ca, "y").node_id(),
            far,
        ],
        visited: vec![o],
    };
    assert_eq!(
        reset_code(&node, &me, kind).await,
        u64::from(code::HOP_LIMIT)
    );
    // A previous hop that is not the sender.
    let kind = StreamKind::Relay {
        route: vec![far],
        visited: vec![other],
    };
    assert_eq!(
        reset_code(&node, &me, kind).await,
        u64::from(code::RELAY_REFUSED)
    );
    // A next hop that is not a member.
    let kind = StreamKind::Relay {
        route: vec![far],
        visited: vec![o],
    };
    assert_eq!(
        reset_code(&node, &me, kind).await,
        u64::from(code::RELAY_UNREACHABLE)
    );
    assert_eq!(node.stats().snapshot().relayed_streams, 0);
    assert!(node.stats().snapshot().relay_refused >= 4);
}

/// A local app's TCP connection through the upstream port is relayed too when the direct link
/// is cut (with and without the pre-authentication engine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_tcp_connection_is_relayed_around_a_cut_link() {
    for engine in [false, true] {
        let (_net, a, b, c) = triangle_with(None, |cfg| {
            cfg.upstreams = vec![overlay::UpstreamConfig {
                service: "echo".into(),
                listen: "127.0.0.1:0".parse().unwrap(),
            }];
            if engine {
                cfg.preauth.engine = Some(overlay::preauth::PreauthConfig::default());
            }
        })
        .await;
        wait_until("a routes to c through b", BOUND, || {
            relays_to(&a, c.node_id()) == Some(vec![b.node_id().to_string()])
        })
        .await;
        let port = a.upstream_addrs()[0].1;
        let data = pattern(20_000, 5);
        let back = tokio::time::timeout(BOUND, echo_through(port, &data))
            .await
            .expect("in time")
            .expect("echo");
        assert_eq!(back, data, "engine {engine}");
        assert_eq!(b.stats().snapshot().relayed_streams, 1, "engine {engine}");
        assert_eq!(
            c.stats().snapshot().e2e_streams_served,
            1,
            "engine {engine}"
        );
    }
}
