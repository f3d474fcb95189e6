//! `meshd demo`: a three-peer overlay on loopback in one process — real UDP, real certificates
//! in a temporary directory — that publishes an echo backend on one peer, sends requests through
//! another, prints what happened with timings, and exits (or stays up with `--keep-running`).

// The demo is a tool that reports real elapsed time, so it reads std's clock.
#![allow(clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use overlay::identity::{self, Validity};
use overlay::membership::MembershipConfig;
use overlay::{Node, NodeConfig, NodeIdentity, ServiceConfig, UpstreamConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Arguments of `meshd demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Request/response round trips to send through the overlay.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub requests: u32,
    /// Leave the overlay running (admin addresses are printed) until Ctrl-C.
    #[arg(long)]
    pub keep_running: bool,
}

async fn echo_backend() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(addr)
}

async fn round_trip(port: SocketAddr, payload: &[u8]) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut s = TcpStream::connect(port).await?;
    s.set_nodelay(true)?;
    s.write_all(payload).await?;
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back).await?;
    anyhow::ensure!(back == payload, "echo mismatch");
    Ok(start.elapsed())
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

/// Runs the demo.
pub async fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("temporary directory")?;
    let now = time::OffsetDateTime::now_utc();
    let ca_dir = dir.path().join("ca");
    let ca = identity::init_ca_dir(&ca_dir, Validity::days_from(now, 1)?, false)?;
    println!(
        "meshd demo: CA and node certificates in {}",
        dir.path().display()
    );
    let backend = echo_backend().await?;
    let names = ["charlie", "bravo", "alpha"];
    let membership = MembershipConfig {
        probe_period: Duration::from_millis(500),
        probe_rtt: Duration::from_millis(200),
        suspect_to_down: Duration::from_secs(2),
        ..MembershipConfig::default()
    };
    let mut nodes: Vec<Node> = Vec::new();
    let mut admins = Vec::new();
    let mut secure_key: Option<overlay::auth::secret::SecretString> = None;
    let started = Instant::now();
    for (i, name) in names.iter().enumerate() {
        let out = dir.path().join(name);
        identity::issue_node_dir(&ca, name, &out, Validity::days_from(now, 1)?, false)?;
        let id = NodeIdentity::load(
            &ca_dir.join(identity::CA_CERT_FILE),
            &out.join(identity::NODE_CERT_FILE),
            &out.join(identity::NODE_KEY_FILE),
        )?;
        let mut cfg = NodeConfig {
            bootstrap: nodes.first().map(|n| vec![n.addr()]).unwrap_or_default(),
            membership: membership.clone(),
            seed: i as u64 + 1,
            ..NodeConfig::default()
        };
        if *name == "charlie" {
            cfg.services.push(ServiceConfig {
                name: "echo".into(),
                backend,
            });
        }
        if *name == "alpha" {
            // Alpha's local apps get predictive pre-authentication (the daemon's default).
            cfg.preauth.engine = Some(overlay::preauth::PreauthConfig::default());
            for service in ["echo", "secure-echo"] {
                cfg.upstreams.push(UpstreamConfig {
                    service: service.into(),
                    listen: "127.0.0.1:0".parse()?,
                });
            }
            if let Some(key) = secure_key.take() {
                cfg.auth.upstream_keys.insert("secure-echo".into(), key);
            }
        }
        let node = Node::bind("127.0.0.1:0".parse()?, id, cfg).await?;
        if *name == "charlie" {
            // A second service that requires a token: registered at runtime with its policy,
            // and an API key that alpha will use to fetch (and refresh) tokens from charlie.
            let policy = overlay::auth::policy::Policy {
                require_token: true,
                ..Default::default()
            };
            node.register_service("secure-echo", backend, Some(policy))
                .await
                .context("registering secure-echo")?;
            let (_key_id, key) = node
                .create_api_key("secure-echo")
                .await
                .context("creating an API key")?;
            secure_key = Some(key);
        }
        let admin = TcpListener::bind("127.0.0.1:0").await?;
        admins.push((name.to_string(), admin.local_addr()?));
        let n = node.clone();
        tokio::spawn(async move {
            let _ = crate::admin::serve(admin, n, None, std::future::pending()).await;
        });
        println!(
            "  peer {name:<8} node id {}  udp {}",
            node.node_id(),
            node.addr()
        );
        nodes.push(node);
    }
    let alpha = nodes[2].clone();
    let charlie_id = nodes[0].node_id();
    tokio::time::timeout(Duration::from_secs(15), async {
        for n in &nodes {
            n.wait_members(|m| m == names.len() - 1).await;
        }
        alpha
            .wait_catalog(|s| {
                ["echo", "secure-echo"].iter().all(|svc| {
                    s.iter()
                        .any(|e| e.name == *svc && e.node_id.0 == charlie_id)
                })
            })
            .await;
    })
    .await
    .context("the demo overlay did not converge within 15 s")?;
    println!(
        "overlay converged in {} (3 peers joined through charlie; alpha sees charlie's `echo` and `secure-echo`)",
        ms(started.elapsed())
    );

    let ups = alpha.upstream_addrs();
    let port_of = |svc: &str| ups.iter().find(|(n, _)| n == svc).map(|(_, a)| *a);
    let port = port_of("echo").context("echo upstream")?;
    println!("sending through alpha's upstream port {port} → QUIC → charlie → echo backend");
    let payload = [0x5a_u8; 64];
    let cold = round_trip(port, &payload).await?;
    println!(
        "  first request (QUIC + mTLS handshake alpha→charlie): {}",
        ms(cold)
    );
    let before = alpha.stats().snapshot();
    let mut lat = Vec::with_capacity(args.requests as usize);
    for _ in 0..args.requests {
        lat.push(round_trip(port, &payload).await?);
    }
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    let after = alpha.stats().snapshot();
    println!(
        "  {} more requests, each a new TCP connection from the app (64 B): p50 {}  p90 {}  p99 {}",
        args.requests,
        ms(pct(0.5)),
        ms(pct(0.9)),
        ms(pct(0.99))
    );
    println!(
        "  pre-authentication: {} served on a pre-opened stream, {} on a warm connection, {} cold; {} handshakes during them",
        after.preauth_hits_stream - before.preauth_hits_stream,
        after.preauth_hits_connection - before.preauth_hits_connection,
        after.preauth_misses - before.preauth_misses,
        after.handshakes - before.handshakes,
    );
    let big = vec![7u8; 8 << 20];
    let t = Instant::now();
    let mut s = TcpStream::connect(port).await?;
    let (mut r, mut w) = s.split();
    let (wr, back) = tokio::join!(
        async {
            w.write_all(&big).await?;
            w.shutdown().await
        },
        async {
            let mut v = Vec::with_capacity(big.len());
            r.read_to_end(&mut v).await.map(|_| v)
        }
    );
    wr?;
    anyhow::ensure!(back? == big, "8 MiB echo mismatch");
    let secs = t.elapsed().as_secs_f64();
    println!(
        "  8 MiB echoed intact in {} ({:.0} MB/s each way)",
        ms(t.elapsed()),
        8.0 * 1.048_576 / secs
    );
    let secure = port_of("secure-echo").context("secure-echo upstream")?;
    println!("authenticated path: alpha's `secure-echo` port {secure} → charlie (token required)");
    let first = round_trip(secure, &payload).await?;
    println!(
        "  first request (API key → token from charlie over the overlay, then the stream): {}",
        ms(first)
    );
    let mut lat = Vec::with_capacity(50);
    for _ in 0..50 {
        lat.push(round_trip(secure, &payload).await?);
    }
    lat.sort();
    println!(
        "  50 more requests (token cached by alpha, verification cached by charlie): p50 {}",
        ms(lat[lat.len() / 2])
    );
    println!("peers as alpha sees them:");
    for p in alpha.peers().await {
        let state = format!("{:?}", p.state).to_lowercase();
        println!(
            "  {:<8} {}  {:<16} {state}",
            p.name,
            p.node_id.0,
            p.addr.to_string()
        );
    }
    let s = alpha.stats().snapshot();
    println!(
        "alpha: {} handshakes, {} streams opened, {} B sent, {} B received",
        s.handshakes, s.streams_opened, s.bytes_sent, s.bytes_received
    );

    if args.keep_running {
        println!("overlay is up; admin APIs:");
        for (name, addr) in &admins {
            println!("  {name:<8} http://{addr}/v1/peers  (meshd status --admin {addr})");
        }
        println!("  echo upstream on alpha: {port}   — Ctrl-C to stop");
        tokio::signal::ctrl_c().await?;
    }
    for n in nodes.iter().rev() {
        n.shutdown().await;
    }
    println!("demo done");
    Ok(())
}
