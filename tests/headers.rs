//! Malformed and oversized stream headers: the stream is reset with an error code and the peer
//! keeps serving everyone else, on the same connection and on others.

use std::time::Duration;

use meshd_suite::*;
use overlay::wire::{self, code, StreamHeader, StreamKind};
use overlay::ServiceConfig;
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(10);

async fn reset_code(conn: &quinn::Connection, bytes: &[u8]) -> u64 {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    let _ = send.finish();
    let mut buf = vec![0u8; 64];
    match timeout(LIMIT, recv.read(&mut buf))
        .await
        .expect("answered promptly")
    {
        Err(quinn::ReadError::Reset(c)) => c.into_inner(),
        other => panic!("expected a reset, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_headers_reset_the_stream_and_the_peer_keeps_serving() {
    let ca = test_ca();
    let backend = echo_server().await;
    let a = spawn(
        &ca,
        "a",
        &[],
        vec![ServiceConfig {
            name: "echo".into(),
            backend,
        }],
        vec![],
    )
    .await;
    let (ep, cfg) = raw_client(&identity(&ca, "tester"));
    let conn = ep
        .connect_with(cfg, a.addr(), &a.node_id().san())
        .unwrap()
        .await
        .unwrap();

    assert_eq!(
        reset_code(&conn, &[2, 0, 1, 0]).await,
        u64::from(code::UNSUPPORTED_VERSION)
    );
    assert_eq!(
        reset_code(&conn, &[1, 0xff, 0xff]).await,
        u64::from(code::TOO_LARGE)
    );
    assert_eq!(
        reset_code(&conn, &[1, 0, 4, 0xff, 0xff, 0xff, 0xff]).await,
        u64::from(code::MALFORMED_HEADER)
    );
    // Truncated: the stream ends inside the header.
    assert_eq!(
        reset_code(&conn, &[1, 0, 9, 0]).await,
        u64::from(code::MALFORMED_HEADER)
    );
    // Well-formed, but the service is not here.
    let unknown = wire::encode_header(&StreamHeader {
        kind: StreamKind::Forward {
            service: "nope".into(),
        },
        request_id: 1,
    });
    assert_eq!(
        reset_code(&conn, &unknown).await,
        u64::from(code::UNKNOWN_SERVICE)
    );
    assert!(a.stats().snapshot().stream_errors >= 5);

    // The same connection still works for a good request.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut req = wire::encode_header(&StreamHeader {
        kind: StreamKind::Forward {
            service: "echo".into(),
        },
        request_id: 2,
    });
    req.extend_from_slice(b"still alive");
    send.write_all(&req).await.unwrap();
    send.finish().unwrap();
    let back = timeout(LIMIT, recv.read_to_end(1024))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, b"still alive");
    ep.close(0u32.into(), b"");
    a.shutdown().await;
}
