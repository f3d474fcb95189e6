//! End-to-end membership: crash detection, joins under loss, and the injected socket.

use std::net::SocketAddr;
use std::time::Duration;

use meshd_suite::*;
use netsim::mem::MemNet;
use overlay::membership::PeerState;
use overlay::{Node, ServiceConfig};
use tokio::time::timeout;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_peer_becomes_down_within_membership_timeouts() {
    let ca = test_ca();
    let a = spawn(&ca, "a", &[], vec![], vec![]).await;
    let b = spawn(&ca, "b", &[a.addr()], vec![], vec![]).await;
    // c runs on its own runtime so that dropping the runtime kills it without a goodbye.
    let c_id = identity(&ca, "c");
    let c_node_id = c_id.node_id();
    let boot = a.addr();
    let (kill_tx, kill_rx) = std::sync::mpsc::channel::<()>();
    let (up_tx, up_rx) = tokio::sync::oneshot::channel();
    let victim = std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let n = Node::bind("127.0.0.1:0".parse().unwrap(), c_id, config(&[boot], 3))
                .await
                .unwrap();
            up_tx.send(()).unwrap();
            n
        });
        kill_rx.recv().unwrap();
        rt.shutdown_background(); // crash: no leave, no close frames
    });
    up_rx.await.unwrap();
    timeout(Duration::from_secs(20), async {
        a.wait_members(|n| n == 2).await;
        b.wait_members(|n| n == 2).await;
    })
    .await
    .expect("cluster of three forms");

    kill_tx.send(()).unwrap();
    victim.join().unwrap();
    // Suspicion is 1 s and probes every 100 ms: well within 10 s, c must be down on both.
    timeout(Duration::from_secs(10), async {
        a.wait_members(|n| n == 1).await;
        b.wait_members(|n| n == 1).await;
    })
    .await
    .expect("crashed peer declared down");
    for n in [&a, &b] {
        let c = n.peers().await;
        let c = c.iter().find(|p| p.node_id.0 == c_node_id);
        assert!(
            c.is_none_or(|p| p.state == PeerState::Down),
            "c is down or forgotten on {}: {c:?}",
            n.name()
        );
    }
    a.shutdown().await;
    b.shutdown().await;
}

async fn spawn_mem(
    net: &MemNet,
    ca: &overlay::identity::CaMaterial,
    name: &str,
    addr: SocketAddr,
    bootstrap: &[SocketAddr],
    services: Vec<ServiceConfig>,
) -> Node {
    let mut cfg = config(bootstrap, addr.port() as u64);
    cfg.services = services;
    Node::spawn(net.bind(addr), identity(ca, name), cfg)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_peers_forward_over_an_in_memory_socket() {
    let net = MemNet::new();
    let ca = test_ca();
    let backend = echo_server().await;
    let a_addr: SocketAddr = "127.0.1.1:7000".parse().unwrap();
    let b_addr: SocketAddr = "127.0.1.2:7000".parse().unwrap();
    let a = spawn_mem(&net, &ca, "a", a_addr, &[], vec![]).await;
    let b = spawn_mem(
        &net,
        &ca,
        "b",
        b_addr,
        &[a_addr],
        vec![ServiceConfig {
            name: "echo".into(),
            backend,
        }],
    )
    .await;
    timeout(
        Duration::from_secs(10),
        a.wait_catalog(|s| s.iter().any(|e| e.name == "echo")),
    )
    .await
    .expect("a learns b's service over the in-memory network");
    assert_eq!(
        a.addr(),
        a_addr,
        "the node uses the injected socket's address"
    );

    let (mut send, mut recv) = a.open_service_stream("echo").await.unwrap();
    let data = pattern(100_000, 7);
    send.write_all(&data).await.unwrap();
    send.finish().unwrap();
    let back = recv.read_to_end(1 << 20).await.unwrap();
    assert!(back == data, "echoed intact over the in-memory network");
    assert!(net.packets_sent() > 50, "traffic went through MemNet");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_peers_join_under_20_percent_packet_loss() {
    let net = MemNet::new();
    net.set_loss(0.2, 42);
    let ca = test_ca();
    let boot: SocketAddr = "127.0.2.1:7000".parse().unwrap();
    let mut nodes = vec![spawn_mem(&net, &ca, "n0", boot, &[], vec![]).await];
    for i in 1..5u8 {
        let addr = SocketAddr::from(([127, 0, 2, 1 + i], 7000));
        nodes.push(spawn_mem(&net, &ca, &format!("n{i}"), addr, &[boot], vec![]).await);
    }
    timeout(Duration::from_secs(60), async {
        for n in &nodes {
            n.wait_members(|m| m == 4).await;
        }
    })
    .await
    .expect("every peer joins despite loss");
    assert!(net.packets_dropped() > 0, "loss was applied");
    for n in nodes {
        n.shutdown().await;
    }
}

/// Regression (issue 5): membership needs no QUIC connection per member. A joiner dials only the
/// bootstrap and, for its catalog pull, its first member (the bootstrap or another), yet holds
/// membership-channel sessions with the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_needs_no_connection_per_member() {
    let ca = test_ca();
    let a = spawn(&ca, "a", &[], vec![], vec![]).await;
    let mut others = Vec::new();
    for name in ["b", "c", "d", "e", "f"] {
        others.push(spawn(&ca, name, &[a.addr()], vec![], vec![]).await);
    }
    timeout(Duration::from_secs(20), async {
        a.wait_members(|n| n == 5).await;
        for n in &others {
            n.wait_members(|n| n == 5).await;
        }
    })
    .await
    .expect("cluster of six forms");
    // Let a few probe rounds pass (probes every 100 ms).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut dials = 0;
    for n in &others {
        let s = n.stats().snapshot();
        dials += s.connections_dialed;
        assert!(s.connections_dialed <= 2, "{}: {s:?}", n.name());
        assert!(
            s.membership_sessions >= 3,
            "{}: sessions with members it has no connection to: {s:?}",
            n.name()
        );
        assert_eq!(s.membership_channel_dropped, 0, "{}", n.name());
    }
    assert!(dials <= 10, "{dials} dials for 5 joins");
    for n in others.iter().chain([&a]) {
        n.shutdown().await;
    }
}

/// A node whose certificate is not from the overlay CA cannot join through the membership
/// channel: its `INIT`, sent straight to a member's UDP socket, is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_from_a_foreign_ca_is_dropped() {
    use overlay::channel::{local_identity, Channel, ChannelConfig};
    let ca = test_ca();
    let a = spawn(&ca, "a", &[], vec![], vec![]).await;
    let evil = test_ca();
    let outsider = identity(&evil, "outsider");
    let mut ch = Channel::new(
        local_identity(&outsider).unwrap(),
        overlay::tls::chain_verifier(&outsider).unwrap(),
        Default::default(),
        ChannelConfig::default(),
        0,
    );
    #[allow(clippy::disallowed_methods)] // the test's wall clock, like the driver's
    let unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    // A foca announce would follow the kind byte; any payload will do to be refused.
    ch.send(
        tokio::time::Instant::now(),
        unix_ms,
        a.node_id(),
        a.addr(),
        &[1, 0, 0],
    )
    .unwrap();
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    while let Some((to, pkt)) = ch.poll_transmit() {
        sock.send_to(&pkt, to).unwrap();
    }
    wait_until("hello dropped", Duration::from_secs(5), || {
        a.stats().snapshot().membership_channel_dropped >= 1
    })
    .await;
    let s = a.stats().snapshot();
    assert_eq!(s.membership_hellos_received, 0);
    assert_eq!(a.peers().await.len(), 0);
    a.shutdown().await;
}
