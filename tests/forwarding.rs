//! End-to-end: peers join through one bootstrap address and forward TCP over QUIC streams.

use std::time::Duration;

use meshd_suite::*;
use overlay::{ServiceConfig, UpstreamConfig};
use tokio::io::AsyncReadExt;
use tokio::time::timeout;

const BOUND: Duration = Duration::from_secs(20);

fn upstream(service: &str) -> Vec<UpstreamConfig> {
    vec![UpstreamConfig {
        service: service.into(),
        listen: "127.0.0.1:0".parse().unwrap(),
    }]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_peers_forward_one_mib_and_100_concurrent_connections() {
    let ca = test_ca();
    let backend = echo_server().await;
    let a = spawn(&ca, "a", &[], vec![], upstream("echo")).await;
    let boot = [a.addr()];
    let b = spawn(&ca, "b", &boot, vec![], vec![]).await;
    let c = spawn(
        &ca,
        "c",
        &boot,
        vec![ServiceConfig {
            name: "echo".into(),
            backend,
        }],
        vec![],
    )
    .await;
    // Everyone learns everyone through the one bootstrap address.
    timeout(BOUND, async {
        a.wait_members(|n| n == 2).await;
        b.wait_members(|n| n == 2).await;
        c.wait_members(|n| n == 2).await;
        a.wait_catalog(|s| {
            s.iter()
                .any(|e| e.name == "echo" && e.node_id.0 == c.node_id())
        })
        .await;
    })
    .await
    .expect("overlay converges");
    let peers = a.peers().await;
    assert_eq!(peers.len(), 2);
    assert!(peers
        .iter()
        .all(|p| p.state == overlay::membership::PeerState::Alive));

    let port = a.upstream_addrs()[0].1;
    let data = pattern(1 << 20, 1);
    let back = timeout(BOUND, echo_through(port, &data))
        .await
        .unwrap()
        .unwrap();
    assert!(back == data, "1 MiB came back intact");

    let mut tasks = Vec::new();
    for i in 0..100u64 {
        tasks.push(tokio::spawn(async move {
            let data = pattern(8 * 1024 + i as usize, i);
            let back = echo_through(port, &data).await.unwrap();
            back == data
        }));
    }
    for t in tasks {
        assert!(
            timeout(BOUND, t).await.unwrap().unwrap(),
            "connection intact"
        );
    }
    let s = c.stats().snapshot();
    assert!(
        s.streams_accepted >= 101,
        "every connection was a stream to c: {s:?}"
    );
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_service_and_stopped_peer_leave_the_catalog() {
    init_tracing();
    let ca = test_ca();
    let backend = echo_server().await;
    let a = spawn(&ca, "a", &[], vec![], vec![]).await;
    let b = spawn(&ca, "b", &[a.addr()], vec![], vec![]).await;
    let svc = |n: &str| ServiceConfig {
        name: n.into(),
        backend,
    };
    let c = spawn(&ca, "c", &[a.addr()], vec![svc("one"), svc("two")], vec![]).await;
    let has = |name: &'static str| {
        move |s: &[overlay::catalog::ServiceEntry]| s.iter().any(|e| e.name == name)
    };
    timeout(BOUND, async {
        a.wait_catalog(has("one")).await;
        b.wait_catalog(has("two")).await;
    })
    .await
    .expect("catalog converges");

    // Removal at runtime withdraws it everywhere.
    assert!(c.unpublish("one"));
    timeout(BOUND, async {
        a.wait_catalog(|s| !s.iter().any(|e| e.name == "one")).await;
        b.wait_catalog(|s| !s.iter().any(|e| e.name == "one")).await;
    })
    .await
    .expect("removal spreads");
    assert!(a.services().iter().any(|e| e.name == "two"));

    // A published service at runtime appears.
    c.publish("three", backend).unwrap();
    timeout(BOUND, b.wait_catalog(has("three")))
        .await
        .expect("publish spreads");

    // Stopping the peer withdraws everything it offered.
    c.shutdown().await;
    timeout(BOUND, async {
        a.wait_catalog(|s| s.is_empty()).await;
        b.wait_catalog(|s| s.is_empty()).await;
        a.wait_members(|n| n == 1).await;
    })
    .await
    .expect("stopped peer's services disappear");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_close_the_local_client_promptly() {
    let ca = test_ca();
    let refused = closed_port().await;
    let a = spawn(&ca, "a", &[], vec![], {
        let mut u = upstream("nowhere");
        u.extend(upstream("broken"));
        u
    })
    .await;
    let c = spawn(
        &ca,
        "c",
        &[a.addr()],
        vec![ServiceConfig {
            name: "broken".into(),
            backend: refused,
        }],
        vec![],
    )
    .await;
    timeout(
        BOUND,
        a.wait_catalog(|s| s.iter().any(|e| e.name == "broken")),
    )
    .await
    .unwrap();
    for (service, port) in a.upstream_addrs() {
        let mut s = tokio::net::TcpStream::connect(port).await.unwrap();
        let mut buf = Vec::new();
        // Unknown service and refused backend: the connection closes (EOF or reset), no data.
        let r = timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{service}: client connection was not closed promptly"));
        assert!(buf.is_empty(), "{service}: no data expected");
        let _ = r;
    }
    assert!(
        c.stats().snapshot().stream_errors >= 1,
        "far side saw the refused backend"
    );
    a.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_client_is_closed_promptly_when_the_far_peer_dies() {
    let ca = test_ca();
    let backend = echo_server().await;
    let a = spawn(&ca, "a", &[], vec![], upstream("echo")).await;
    let c_identity = identity(&ca, "c");
    let boot = a.addr();
    let (kill_tx, kill_rx) = std::sync::mpsc::channel::<()>();
    let (up_tx, up_rx) = tokio::sync::oneshot::channel();
    // c runs on its own runtime: dropping it is a crash (no leave, no close frames).
    let victim = std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let mut cfg = config(&[boot], 9);
            cfg.services = vec![ServiceConfig {
                name: "echo".into(),
                backend,
            }];
            let n = overlay::Node::bind("127.0.0.1:0".parse().unwrap(), c_identity, cfg)
                .await
                .unwrap();
            up_tx.send(()).unwrap();
            n
        });
        kill_rx.recv().unwrap();
        rt.shutdown_background();
    });
    up_rx.await.unwrap();
    timeout(
        BOUND,
        a.wait_catalog(|s| s.iter().any(|e| e.name == "echo")),
    )
    .await
    .unwrap();
    let port = a.upstream_addrs()[0].1;
    let mut s = tokio::net::TcpStream::connect(port).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut s, b"ping")
        .await
        .unwrap();
    let mut buf = [0u8; 4];
    timeout(BOUND, s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"ping", "stream is up before the crash");

    kill_tx.send(()).unwrap();
    victim.join().unwrap();
    // Membership declares c down within ~1 s (test timings); the QUIC idle timeout is 30 s.
    let mut rest = Vec::new();
    let closed = timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "client connection closed promptly after the peer died"
    );
    a.shutdown().await;
}
