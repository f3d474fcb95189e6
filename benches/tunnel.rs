//! Tunnel cost: one stream's throughput and request/response latency through two meshd peers
//! on loopback, beside direct TCP and a raw quinn stream (same TLS, same machine) measured in
//! the same run.
//!
//! Run: `cargo bench --bench tunnel` (results: docs/BENCHMARKS.md).

#![allow(clippy::unwrap_used, clippy::disallowed_methods)] // a benchmark measures real time

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use meshd_suite::*;
use overlay::{Node, ServiceConfig, UpstreamConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Reads everything, then answers with the byte count (u64 BE) and closes.
async fn sink_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let mut buf = vec![0u8; 256 * 1024];
                let mut n = 0u64;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k as u64,
                    }
                }
                let _ = s.write_all(&n.to_be_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// A raw quinn server with meshd's TLS config. Each stream starts with a mode byte:
/// `e` echoes the stream back as it arrives, `s` sinks it and answers with the byte count.
async fn raw_quinn_pair(
    ca: &overlay::identity::CaMaterial,
) -> (quinn::Endpoint, quinn::Connection) {
    let server_id = identity(ca, "raw-server");
    let tls = overlay::tls::server_config(&server_id, Default::default()).unwrap();
    let qs = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let server = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(qs)),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let saddr = server.local_addr().unwrap();
    tokio::spawn(async move {
        while let Some(inc) = server.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = inc.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        let mut mode = [0u8; 1];
                        if recv.read_exact(&mut mode).await.is_err() {
                            return;
                        }
                        let mut buf = vec![0u8; 256 * 1024];
                        let mut n = 0u64;
                        while let Ok(Some(k)) = recv.read(&mut buf).await {
                            if mode[0] == b'e' && send.write_all(&buf[..k]).await.is_err() {
                                return;
                            }
                            n += k as u64;
                        }
                        if mode[0] == b's' {
                            let _ = send.write_all(&n.to_be_bytes()).await;
                        }
                        let _ = send.finish();
                    });
                }
            });
        }
    });
    let (client, mut cfg) = raw_client(&identity(ca, "raw-client"));
    // Keep the connection open between benchmark groups (quinn's default idle timeout is 30 s).
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(1)));
    cfg.transport_config(Arc::new(transport));
    let conn = client
        .connect_with(cfg, saddr, &overlay::tls::server_name_for(None))
        .unwrap()
        .await
        .unwrap();
    (client, conn)
}

async fn tcp_rr(addr: SocketAddr, req: &[u8]) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(req).await.unwrap();
    let mut back = [0u8; 64];
    s.read_exact(&mut back).await.unwrap();
}

async fn quinn_rr(conn: &quinn::Connection, req: &[u8]) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(b"e").await.unwrap();
    send.write_all(req).await.unwrap();
    send.finish().unwrap();
    let mut back = [0u8; 64];
    recv.read_exact(&mut back).await.unwrap();
}

async fn tcp_bulk(addr: SocketAddr, data: &[u8]) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(data).await.unwrap();
    s.shutdown().await.unwrap();
    let mut n = [0u8; 8];
    s.read_exact(&mut n).await.unwrap();
    assert_eq!(u64::from_be_bytes(n), data.len() as u64);
}

async fn quinn_bulk(conn: &quinn::Connection, data: &[u8]) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(b"s").await.unwrap();
    send.write_all(data).await.unwrap();
    send.finish().unwrap();
    let mut n = [0u8; 8];
    recv.read_exact(&mut n).await.unwrap();
    assert_eq!(u64::from_be_bytes(n), data.len() as u64);
}

struct Setup {
    _peers: Vec<Node>,
    echo: SocketAddr,
    sink: SocketAddr,
    tunnel_echo: SocketAddr,
    tunnel_sink: SocketAddr,
    _raw_ep: quinn::Endpoint,
    raw: quinn::Connection,
}

async fn setup() -> Setup {
    let ca = test_ca();
    let echo = echo_server().await;
    let sink = sink_server().await;
    let up = |s: &str| UpstreamConfig {
        service: s.into(),
        listen: "127.0.0.1:0".parse().unwrap(),
    };
    let a = spawn(&ca, "a", &[], vec![], vec![up("echo"), up("sink")]).await;
    let b = spawn(
        &ca,
        "b",
        &[a.addr()],
        vec![
            ServiceConfig {
                name: "echo".into(),
                backend: echo,
            },
            ServiceConfig {
                name: "sink".into(),
                backend: sink,
            },
        ],
        vec![],
    )
    .await;
    a.wait_catalog(|s| s.iter().filter(|e| !e.local).count() == 2)
        .await;
    let ups = a.upstream_addrs();
    let port = |s: &str| ups.iter().find(|(n, _)| n == s).unwrap().1;
    let (raw_ep, raw) = raw_quinn_pair(&ca).await;
    let setup = Setup {
        _peers: vec![a.clone(), b],
        echo,
        sink,
        tunnel_echo: port("echo"),
        tunnel_sink: port("sink"),
        _raw_ep: raw_ep,
        raw,
    };
    // Warm the tunnel's QUIC connection so every measurement is on an open connection.
    tcp_rr(setup.tunnel_echo, &[1u8; 64]).await;
    setup
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let s = rt.block_on(setup());
    let req = [0x42u8; 64];

    let mut g = c.benchmark_group("request_response_64B");
    g.sample_size(30).measurement_time(Duration::from_secs(4));
    let cases: [(&str, SocketAddr); 2] = [("direct_tcp", s.echo), ("meshd_tunnel", s.tunnel_echo)];
    for (name, addr) in cases {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let t = Instant::now();
                    for _ in 0..iters {
                        tcp_rr(addr, &req).await;
                    }
                    t.elapsed()
                })
            })
        });
    }
    g.bench_function("raw_quinn_stream", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for _ in 0..iters {
                    quinn_rr(&s.raw, &req).await;
                }
                t.elapsed()
            })
        })
    });
    g.finish();

    // Steady state: 64 B ping-pong on one established connection (TCP through the tunnel, a
    // direct TCP connection, one raw quinn stream).
    let mut g = c.benchmark_group("ping_pong_64B_established");
    g.sample_size(30).measurement_time(Duration::from_secs(4));
    for (name, addr) in [("direct_tcp", s.echo), ("meshd_tunnel", s.tunnel_echo)] {
        let mut conn = rt.block_on(async {
            let c = TcpStream::connect(addr).await.unwrap();
            c.set_nodelay(true).unwrap();
            c
        });
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut back = [0u8; 64];
                    let t = Instant::now();
                    for _ in 0..iters {
                        conn.write_all(&req).await.unwrap();
                        conn.read_exact(&mut back).await.unwrap();
                    }
                    t.elapsed()
                })
            })
        });
    }
    let (mut send, mut recv) = rt.block_on(async {
        let (mut send, recv) = s.raw.open_bi().await.unwrap();
        send.write_all(b"e").await.unwrap();
        (send, recv)
    });
    g.bench_function("raw_quinn_stream", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut back = [0u8; 64];
                let t = Instant::now();
                for _ in 0..iters {
                    send.write_all(&req).await.unwrap();
                    recv.read_exact(&mut back).await.unwrap();
                }
                t.elapsed()
            })
        })
    });
    g.finish();

    let size = 32usize << 20;
    let data = vec![0xabu8; size];
    let mut g = c.benchmark_group("one_stream_throughput");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(8))
        .throughput(Throughput::Bytes(size as u64));
    for (name, addr) in [("direct_tcp", s.sink), ("meshd_tunnel", s.tunnel_sink)] {
        g.bench_with_input(BenchmarkId::new(name, "32MiB"), &addr, |b, &addr| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let t = Instant::now();
                    for _ in 0..iters {
                        tcp_bulk(addr, &data).await;
                    }
                    t.elapsed()
                })
            })
        });
    }
    g.bench_function(BenchmarkId::new("raw_quinn_stream", "32MiB"), |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for _ in 0..iters {
                    quinn_bulk(&s.raw, &data).await;
                }
                t.elapsed()
            })
        })
    });
    g.finish();
}

criterion_group!(tunnel, benches);
criterion_main!(tunnel);
