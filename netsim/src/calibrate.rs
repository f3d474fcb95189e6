//! Calibration of the CPU cost of a handshake, which virtual time does not see (crypto runs
//! between two instants of the paused clock). Runs `n` sequential mutual-TLS QUIC handshakes
//! between two endpoints built with overlay's own TLS configs, over a zero-latency [`SimNet`]
//! on one current-thread runtime, and reads this thread's CPU time from
//! `/proc/thread-self/schedstat` (nanoseconds on CPU). Both sides run on the thread, so the
//! cost per side is half the cost per handshake. The result feeds `peers.handshake_cpu_us`.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::link::LinkSpec;
use crate::net::{peer_addr, SimNet};
use crate::pki::SimPki;
use crate::topology::LatencyModel;

/// What calibration measured.
#[derive(Clone, Debug, Serialize)]
pub struct Calibration {
    /// Handshakes per measurement.
    pub handshakes: u32,
    /// CPU per full handshake, both sides, µs.
    pub full_both_us: f64,
    /// CPU per full handshake, per side (what `peers.handshake_cpu_us` charges), µs.
    pub full_per_side_us: f64,
    /// CPU per resumed (1-RTT, session ticket) handshake, both sides, µs.
    pub resumed_both_us: f64,
    /// Whether the thread CPU clock was available (else wall time was used).
    pub thread_cpu_clock: bool,
}

fn thread_cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Runs the calibration (`n` handshakes of each kind).
pub fn calibrate(n: u32) -> anyhow::Result<Calibration> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let pki = SimPki::new(0xca1)?;
        let server_id = pki.node("server", 0)?;
        let client_id = pki.node("client", 1)?;
        let net = SimNet::new(LatencyModel::uniform(2, 0.0), LinkSpec::default(), 1);
        let runtime = quinn::default_runtime().ok_or_else(|| anyhow::anyhow!("no runtime"))?;
        // No chain cache: every handshake checks the peer's chain, as with a new peer.
        let cold = |id: &overlay::NodeIdentity| overlay::tls::TlsSettings {
            chain_cache: Some(overlay::tls::ChainCache::new(id, 0)),
            ..Default::default()
        };
        let server_tls = overlay::tls::server_config(&server_id, cold(&server_id))?;
        let server_cfg = quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(server_tls)?,
        ));
        let server = quinn::Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            Some(server_cfg),
            net.bind(0, peer_addr(0)),
            runtime.clone(),
        )?;
        let client = quinn::Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            None,
            net.bind(1, peer_addr(1)),
            runtime,
        )?;
        let name = overlay::tls::server_name_for(Some(server_id.node_id()));
        let mut full_tls = overlay::tls::client_config(&client_id, cold(&client_id))?;
        full_tls.resumption = rustls::client::Resumption::disabled();
        let full = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(full_tls)?,
        ));
        let resumed =
            quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(
                overlay::tls::client_config(&client_id, cold(&client_id))?,
            )?));
        let deny = overlay::tls::DenySet::default();
        let now_unix = 1_800_000_000;
        let measure = |cfg: quinn::ClientConfig| {
            let server = server.clone();
            let client = client.clone();
            let name = name.clone();
            let deny = deny.clone();
            async move {
                #[allow(clippy::disallowed_methods)] // fallback wall clock for calibration
                let wall = std::time::Instant::now();
                let cpu0 = thread_cpu_ns();
                for _ in 0..n {
                    let accept = async {
                        let inc = server.accept().await?;
                        let c = inc.await.ok()?;
                        overlay::tls::authenticate_peer(&c, &deny, now_unix).ok()?;
                        Some(c)
                    };
                    let connect = async {
                        let c = client.connect_with(cfg.clone(), peer_addr(0), &name).ok()?;
                        let c = c.await.ok()?;
                        overlay::tls::authenticate_peer(&c, &deny, now_unix).ok()?;
                        Some(c)
                    };
                    let (s, c) = tokio::join!(accept, connect);
                    let (Some(s), Some(c)) = (s, c) else {
                        anyhow::bail!("calibration handshake failed");
                    };
                    // Let tickets arrive, then close.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    c.close(0u32.into(), b"");
                    s.close(0u32.into(), b"");
                }
                let us = match (cpu0, thread_cpu_ns()) {
                    (Some(a), Some(b)) => (b - a) as f64 / 1000.0 / f64::from(n),
                    _ => wall.elapsed().as_secs_f64() * 1e6 / f64::from(n),
                };
                Ok::<f64, anyhow::Error>(us)
            }
        };
        // Warm up caches and allocators.
        measure(full.clone()).await?;
        let full_us = measure(full).await?;
        let resumed_us = measure(resumed).await?;
        let r = |x: f64| (x * 10.0).round() / 10.0;
        Ok(Calibration {
            handshakes: n,
            full_both_us: r(full_us),
            full_per_side_us: r(full_us / 2.0),
            resumed_both_us: r(resumed_us),
            thread_cpu_clock: thread_cpu_ns().is_some(),
        })
    })
}
