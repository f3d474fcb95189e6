//! Driver of the router ([`crate::routing`]): probes, QUIC path statistics, signed route
//! summaries sent to the peers that probe us, relayed streams with end-to-end TLS, and requests
//! that are retried on another instance or path when they got no response byte.
//!
//! ```text
//! probe loop (every probe_interval)
//!   ├─ QUIC rtt/loss of open connections → Router::on_quic_stats
//!   ├─ Router::tick → probe datagrams (kind 4), links marked down
//!   └─ every summary_interval: sign our summary if it changed → to recent probers (kind 3)
//! probe received → answer (kind 5); the prober lacks our current summary → send it (kind 3)
//! exchange(service, request)
//!   └─ Router::choose → open direct or relayed → write → first byte within the deadline?
//!        no: mark, exclude, retry (at most max_attempts); yes: feed the peak-EWMA
//! Relay stream (kind Relay)
//!   ├─ route empty: destination — TLS server over the stream, inner header, serve forward
//!   └─ else: check path and quotas, open Relay to the next hop, copy bytes both ways
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use quinn::VarInt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout, Instant};
use tracing::{debug, info, warn};

use super::{lock, open_stream, read, ForwardError, Inner};
use crate::catalog::signed::CatalogSigner;
use crate::identity::{CertInfo, NodeId, NodeIdentity};
use crate::routing::{summary, Choice, Router, RoutingConfig};
use crate::stats;
use crate::wire::{self, code, LoadReport, Probe, StreamHeader, StreamKind};

/// A bidirectional byte stream to a service: a QUIC stream, or TLS over a relayed one.
pub trait Duplex: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Duplex for T {}

/// The routing state of a node.
pub(super) struct State {
    pub(super) router: Mutex<Router>,
    /// Peers that probed us lately, and which of our summaries each was sent.
    probers: Mutex<HashMap<NodeId, Prober>>,
    signer: CatalogSigner,
    e2e_server: Arc<rustls::ServerConfig>,
    e2e_client: Arc<rustls::ClientConfig>,
    /// Streams relayed now, in all and per origin.
    relayed: AtomicUsize,
    relayed_by_origin: Mutex<HashMap<NodeId, usize>>,
    /// Forwards served now (our load).
    serving: Arc<AtomicUsize>,
    /// Last summary we published (to skip unchanged ones), when, and its datagram.
    published: Mutex<Option<Published>>,
    rng_state: AtomicU64,
    /// Bumped whenever a link or member goes down: in-flight attempts re-check their path.
    pub(super) events: tokio::sync::watch::Sender<u64>,
}

/// Our last published summary.
struct Published {
    summary: wire::RouteSummary,
    at: Instant,
    /// The route datagram (kind 3) carrying it, signed.
    datagram: Bytes,
}

/// A peer that probes us: it measures its link to us, so it wants our summary (it may relay
/// through us or send to us).
struct Prober {
    last_probe: Instant,
    /// The version of our summary last sent to it, and when.
    sent: Option<(wire::CatalogVersion, Instant)>,
}

/// Most probers remembered (least recently probing first out).
const MAX_PROBERS: usize = 256;
/// A new summary is pushed at once to the peers that probed us within this.
const PROBER_WINDOW: Duration = Duration::from_secs(6);
/// An unchanged summary is sent again to a prober this often (receivers drop summaries not
/// refreshed within `summary_ttl`, 30 s by default).
const RESEND: Duration = Duration::from_secs(10);
/// Instances of a service in use that are kept probed.
const PROBED_INSTANCES: usize = 8;
/// A summary is republished at least this often while it has links.
const HEARTBEAT: Duration = Duration::from_secs(60);

impl State {
    pub(super) fn new(
        identity: &NodeIdentity,
        generation: u64,
        cfg: RoutingConfig,
        tls: crate::tls::TlsSettings,
        seed: u64,
    ) -> Result<Self, String> {
        let (e2e_server, e2e_client) =
            crate::tls::e2e_configs(identity, tls).map_err(|e| e.to_string())?;
        Ok(Self {
            router: Mutex::new(Router::new(identity.info.node_id, generation, cfg)),
            probers: Mutex::new(HashMap::new()),
            signer: CatalogSigner::new(&identity.key).map_err(|e| e.to_string())?,
            e2e_server,
            e2e_client,
            relayed: AtomicUsize::new(0),
            relayed_by_origin: Mutex::new(HashMap::new()),
            serving: Arc::new(AtomicUsize::new(0)),
            published: Mutex::new(None),
            rng_state: AtomicU64::new(seed ^ 0x726f_7574),
            events: tokio::sync::watch::channel(0).0,
        })
    }

    pub(super) fn pick(&self, n: usize) -> usize {
        // splitmix64 on a seeded counter: deterministic under netsim.
        let mut z = self
            .rng_state
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z % n.max(1) as u64) as usize
    }
}

/// Counts a forward being served while alive (our load in summaries).
pub(super) struct Serving(Arc<AtomicUsize>);

impl Serving {
    pub(super) fn start(inner: &Inner) -> Self {
        inner.routing.serving.fetch_add(1, Ordering::Relaxed);
        Self(inner.routing.serving.clone())
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// Membership, probes, gossip

/// Membership said `peer` is up.
pub(super) fn on_member_up(inner: &Inner, peer: NodeId) {
    lock(&inner.routing.router).member_up(peer);
}

/// Membership said `peer` is down.
pub(super) fn on_member_down(inner: &Inner, peer: NodeId) {
    lock(&inner.routing.router).member_down(peer);
    inner.routing.events.send_modify(|v| *v += 1);
}

/// Probes, QUIC statistics and summary publication.
pub(super) async fn probe_loop(inner: Arc<Inner>) {
    let (interval, summary_every) = {
        let r = lock(&inner.routing.router);
        (r.config().probe_interval, r.config().summary_interval)
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_summary = Instant::now() + summary_every;
    loop {
        tick.tick().await;
        let now = Instant::now();
        let conns: Vec<(NodeId, quinn::Connection)> = lock(&inner.conns)
            .iter()
            .filter(|(_, (c, _))| c.close_reason().is_none())
            .map(|(id, (c, _))| (*id, c.clone()))
            .collect();
        let out = {
            let mut r = lock(&inner.routing.router);
            for (id, c) in &conns {
                let s = c.stats();
                r.on_quic_stats(*id, c.rtt(), s.path.lost_packets, s.path.sent_packets, now);
            }
            r.tick(now)
        };
        for peer in &out.down {
            stats::inc(&inner.stats.route_links_down);
            info!(peer = %peer.fmt_short(), "link marked down (probes unanswered)");
        }
        if !out.down.is_empty() {
            inner.routing.events.send_modify(|v| *v += 1);
        }
        if !out.probes.is_empty() {
            let coord = lock(&inner.routing.router).coord();
            for p in out.probes {
                let payload = Bytes::from(wire::encode_probe(
                    wire::DATAGRAM_PROBE,
                    &Probe {
                        nonce: p.nonce,
                        coord,
                    },
                ));
                send_datagram(&inner, p.peer, payload);
                stats::inc(&inner.stats.route_probes_sent);
            }
        }
        if now >= next_summary {
            next_summary = now + summary_every;
            publish_summary(&inner, now);
        }
    }
}

/// Sends a routing payload to `peer` on the membership channel (no QUIC connection: probing
/// never dials, nor keeps a connection from idling out).
fn send_datagram(inner: &Arc<Inner>, peer: NodeId, payload: Bytes) {
    if inner.shutting_down.load(Ordering::Relaxed) {
        return;
    }
    let cmd = super::Cmd::Channel {
        to: peer,
        payload: payload.to_vec(),
    };
    // Probes tolerate loss: drop rather than queue without bound.
    let _ = inner.membership_tx.try_send(cmd);
}

fn publish_summary(inner: &Arc<Inner>, now: Instant) {
    let load = LoadReport {
        serving: inner.routing.serving.load(Ordering::Relaxed) as u32,
        relaying: inner.routing.relayed.load(Ordering::Relaxed) as u32,
        backend_us: 0,
    };
    let summary = {
        let mut r = lock(&inner.routing.router);
        r.set_load(load);
        r.local_summary()
    };
    if summary.links.is_empty() {
        return;
    }
    if let Some(old) = lock(&inner.routing.published).as_ref() {
        if now.saturating_duration_since(old.at) < HEARTBEAT
            && !material_change(&old.summary, &summary)
        {
            return;
        }
    }
    let signed = match summary::sign(&inner.routing.signer, &summary) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "route summary cannot be signed");
            return;
        }
    };
    let Some(item) = wire::encode_route_item(&signed) else {
        return;
    };
    let mut datagram = vec![wire::DATAGRAM_ROUTES];
    datagram.extend_from_slice(&wire::encode_gossip_items([item.as_slice()]));
    let datagram = Bytes::from(datagram);
    let version = summary.version;
    *lock(&inner.routing.published) = Some(Published {
        summary,
        at: now,
        datagram: datagram.clone(),
    });
    stats::inc(&inner.stats.route_summaries_published);
    // Straight to the peers measuring their link to us; the others get it if they probe us.
    let to: Vec<NodeId> = {
        let mut probers = lock(&inner.routing.probers);
        probers
            .iter_mut()
            .filter(|(_, p)| now.saturating_duration_since(p.last_probe) < PROBER_WINDOW)
            .map(|(id, p)| {
                p.sent = Some((version, now));
                *id
            })
            .collect()
    };
    for peer in to {
        send_summary(inner, peer, datagram.clone());
    }
}

fn send_summary(inner: &Arc<Inner>, peer: NodeId, datagram: Bytes) {
    send_datagram(inner, peer, datagram);
    stats::inc(&inner.stats.route_gossip_sent);
}

/// `peer` probed us: it gets our summary if it does not hold the current one (or not lately).
fn on_probed(inner: &Arc<Inner>, peer: NodeId, now: Instant) {
    let push = {
        let published = lock(&inner.routing.published);
        let mut probers = lock(&inner.routing.probers);
        if probers.len() >= MAX_PROBERS && !probers.contains_key(&peer) {
            if let Some(oldest) = probers
                .iter()
                .min_by_key(|(_, p)| p.last_probe)
                .map(|(id, _)| *id)
            {
                probers.remove(&oldest);
            }
        }
        let p = probers.entry(peer).or_insert(Prober {
            last_probe: now,
            sent: None,
        });
        p.last_probe = now;
        match published.as_ref() {
            Some(pb)
                if !p.sent.is_some_and(|(v, at)| {
                    v == pb.summary.version && now.saturating_duration_since(at) < RESEND
                }) =>
            {
                p.sent = Some((pb.summary.version, now));
                Some(pb.datagram.clone())
            }
            _ => None,
        }
    };
    if let Some(d) = push {
        send_summary(inner, peer, d);
    }
}

/// Whether a summary differs enough from the last published one to spread it.
fn material_change(old: &wire::RouteSummary, new: &wire::RouteSummary) -> bool {
    if old.relays != new.relays || old.links.len() != new.links.len() {
        return true;
    }
    let load = |l: &LoadReport| i64::from(l.serving + l.relaying);
    if (load(&old.load) - load(&new.load)).abs() >= 8 {
        return true;
    }
    if old.coord.distance_ms(&new.coord) > 5.0 {
        return true;
    }
    old.links.iter().zip(&new.links).any(|(a, b)| {
        a.peer != b.peer
            || (f64::from(a.rtt_us) - f64::from(b.rtt_us)).abs()
                > 0.25 * f64::from(a.rtt_us).max(1000.0)
            || a.loss_ppm.abs_diff(b.loss_ppm) > 10_000
    })
}

/// A route datagram (kind 3) from `from`: summaries are accepted from their origin only (the
/// channel or TLS authenticated the sender, so the envelope's signature is not checked again).
pub(super) fn handle_gossip(inner: &Inner, from: &CertInfo, payload: &[u8]) {
    let items = match wire::decode_route_gossip(payload) {
        Ok(i) => i,
        Err(e) => {
            stats::inc(&inner.stats.route_summaries_refused);
            debug!(peer = %from.node_id.fmt_short(), error = %e, "bad route datagram");
            return;
        }
    };
    let now = Instant::now();
    for s in items {
        let body = match summary::open_from(&s, &from.node_id) {
            Ok(b) => b,
            Err(e) => {
                stats::inc(&inner.stats.route_summaries_refused);
                debug!(peer = %from.node_id.fmt_short(), error = %e, "route summary refused");
                continue;
            }
        };
        if inner.deny.is_node_denied(&body.node_id) {
            continue;
        }
        if lock(&inner.routing.router).on_summary(body, now) {
            stats::inc(&inner.stats.route_summaries_applied);
        }
    }
}

/// A probe (kind 4) or probe answer (kind 5) from `from`.
pub(super) fn handle_probe(inner: &Arc<Inner>, from: &CertInfo, kind: u8, payload: &[u8]) {
    let Ok(p) = wire::decode_probe(payload) else {
        stats::inc(&inner.stats.route_summaries_refused);
        return;
    };
    if kind == wire::DATAGRAM_PROBE {
        let coord = lock(&inner.routing.router).coord();
        let ack = wire::encode_probe(
            wire::DATAGRAM_PROBE_ACK,
            &Probe {
                nonce: p.nonce,
                coord,
            },
        );
        send_datagram(inner, from.node_id, Bytes::from(ack));
        on_probed(inner, from.node_id, Instant::now());
    } else {
        lock(&inner.routing.router).on_probe_ack(from.node_id, p.nonce, p.coord, Instant::now());
    }
}

// ---------------------------------------------------------------------------------------------
// Requests

/// One attempt of a routed request.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Attempt {
    /// The instance tried.
    pub provider: NodeId,
    /// Relays of the path tried.
    pub relays: Vec<NodeId>,
    /// Why it failed (None: it answered).
    pub error: Option<String>,
}

/// A request that got its first response byte: the rest of the response follows on `io`.
pub struct Exchange {
    /// The stream (the request is written; finished if asked).
    pub io: Box<dyn Duplex>,
    /// The first response bytes.
    pub first: Vec<u8>,
    /// Every attempt, the answering one last.
    pub attempts: Vec<Attempt>,
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchange")
            .field("first", &self.first.len())
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

/// A request that got no response byte on any attempt.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct ExchangeError {
    /// The last failure.
    pub error: ForwardError,
    /// Every attempt.
    pub attempts: Vec<Attempt>,
}

/// Sends `request` to an instance of `service` on the best path and waits for the first byte
/// of the answer; an attempt that gets none in time (or whose stream fails first) is retried
/// on another instance or path. Only for services whose requests may be repeated (a retried
/// request may have reached the first instance).
pub async fn exchange(
    inner: &Arc<Inner>,
    service: &str,
    request: &[u8],
    finish: bool,
) -> Result<Exchange, ExchangeError> {
    let max = lock(&inner.routing.router).config().max_attempts.max(1);
    let mut attempts: Vec<Attempt> = Vec::new();
    let mut exclude: Vec<NodeId> = Vec::new();
    let mut last = ForwardError::NoProvider(service.into());
    for n in 0..max {
        let providers = read(&inner.catalog).providers(service);
        let choice = {
            let mut r = lock(&inner.routing.router);
            // Every instance of a service in use is probed (a few at most), not only those
            // chosen lately: a dead idle instance is known dead before a request picks it.
            if n == 0 {
                for p in providers.iter().take(PROBED_INSTANCES) {
                    r.touch(*p, Instant::now());
                }
            }
            let st = &inner.routing;
            let mut c = r.choose(&providers, &exclude, Instant::now(), |k| st.pick(k));
            // A relayed attempt that failed excludes its path, not its instance: the router
            // routes around a dead relay. The same path again means no other is known.
            if let Some(ch) = &c {
                if attempts
                    .iter()
                    .any(|a| a.provider == ch.provider && a.relays == ch.path.relays)
                {
                    exclude.push(ch.provider);
                    c = r.choose(&providers, &exclude, Instant::now(), |k| st.pick(k));
                }
            }
            c
        };
        let Some(choice) = choice else {
            break;
        };
        if n > 0 {
            stats::inc(&inner.stats.requests_retried);
        }
        let deadline = lock(&inner.routing.router).first_byte_timeout(&choice);
        let provider = choice.provider;
        let relays = choice.path.relays.clone();
        {
            let mut r = lock(&inner.routing.router);
            r.request_started(provider);
            r.touch(provider, Instant::now());
            for h in &relays {
                r.touch(*h, Instant::now());
            }
        }
        let t0 = Instant::now();
        tracing::trace!(node = %inner.info.name, service, provider = %provider.fmt_short(), relays = relays.len(), attempt = n, "attempt");
        let mut events = inner.routing.events.subscribe();
        // A relayed attempt chosen while the instance's direct link was up is abandoned when
        // that link goes down too: the instance itself is the likely casualty.
        let direct_down_at_start = lock(&inner.routing.router).link_down(&provider);
        let broken = async {
            loop {
                if events.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
                let r = lock(&inner.routing.router);
                let dead = |p: &NodeId| !r.is_member(p) || r.link_down(p);
                let first_hop = relays.first().unwrap_or(&provider);
                if !r.is_member(&provider)
                    || dead(first_hop)
                    || relays.iter().any(|h| !r.is_member(h))
                    || (!direct_down_at_start && r.link_down(&provider))
                {
                    return;
                }
            }
        };
        let res = tokio::select! {
            r = timeout(deadline, attempt(inner, service, &choice, request, finish)) => r.map_err(|_| false),
            _ = broken => Err(true),
        };
        let (outcome, timed_out) = match res {
            Ok(Ok((io, first))) => (Ok((io, first)), false),
            Ok(Err(e)) => (Err(e), false),
            Err(true) => (
                Err(ForwardError::Stream {
                    peer: provider,
                    reason: "path failed before any response byte".into(),
                }),
                false,
            ),
            Err(false) => (
                Err(ForwardError::Stream {
                    peer: provider,
                    reason: format!("no response byte within {} ms", deadline.as_millis()),
                }),
                true,
            ),
        };
        match outcome {
            Ok((io, first)) => {
                lock(&inner.routing.router).request_ended(
                    provider,
                    choice.path.cost_ms,
                    Some(t0.elapsed()),
                    Instant::now(),
                );
                attempts.push(Attempt {
                    provider,
                    relays,
                    error: None,
                });
                return Ok(Exchange {
                    io,
                    first,
                    attempts,
                });
            }
            Err(e) => {
                {
                    let mut r = lock(&inner.routing.router);
                    r.request_ended(provider, choice.path.cost_ms, None, Instant::now());
                    // A direct path that timed out or broke: suspect the link at once (probes
                    // bring it back). A relayed one: the relays' links are probed anyway.
                    let link_level = timed_out || matches!(e, ForwardError::Dial { .. });
                    if relays.is_empty() && link_level && r.on_request_failed(provider) {
                        stats::inc(&inner.stats.route_links_down);
                        inner.routing.events.send_modify(|v| *v += 1);
                    }
                }
                debug!(node = %inner.info.name, service, provider = %provider.fmt_short(), relays = relays.len(), attempt = n, error = %e, "attempt failed");
                let direct = relays.is_empty();
                attempts.push(Attempt {
                    provider,
                    relays,
                    error: Some(e.to_string()),
                });
                // A relayed failure excludes the instance too when its direct link is down:
                // then it is most likely the instance that died, not the relay.
                if direct || lock(&inner.routing.router).link_down(&provider) {
                    exclude.push(provider);
                }
                last = e;
            }
        }
    }
    Err(ExchangeError {
        error: last,
        attempts,
    })
}

async fn attempt(
    inner: &Arc<Inner>,
    service: &str,
    choice: &Choice,
    request: &[u8],
    finish: bool,
) -> Result<(Box<dyn Duplex>, Vec<u8>), ForwardError> {
    let peer = choice.provider;
    let limit = lock(&inner.routing.router).config().connect_timeout;
    let mut io = timeout(limit, open_path(inner, service, choice))
        .await
        .map_err(|_| ForwardError::Stream {
            peer,
            reason: format!("path not open within {} ms", limit.as_millis()),
        })??;
    let failed = |e: std::io::Error| ForwardError::Stream {
        peer,
        reason: e.to_string(),
    };
    io.write_all(request).await.map_err(failed)?;
    if finish {
        io.shutdown().await.map_err(failed)?;
    } else {
        io.flush().await.map_err(failed)?;
    }
    let mut buf = vec![0u8; 16 * 1024];
    let n = io.read(&mut buf).await.map_err(failed)?;
    if n == 0 {
        return Err(ForwardError::Stream {
            peer,
            reason: "closed before any response byte".into(),
        });
    }
    buf.truncate(n);
    Ok((io, buf))
}

/// The router's choice for a local connection to `service`, if its path goes through relays
/// (else the direct paths — pre-authenticated or shared — serve it).
pub(super) fn relayed_choice(inner: &Inner, service: &str) -> Option<Choice> {
    let providers = read(&inner.catalog).providers(service);
    let mut r = lock(&inner.routing.router);
    for p in providers.iter().take(PROBED_INSTANCES) {
        r.touch(*p, Instant::now());
    }
    let st = &inner.routing;
    r.choose(&providers, &[], Instant::now(), |k| st.pick(k))
        .filter(|c| !c.path.relays.is_empty())
}

/// The stream kind that asks `peer` for `service` (with a token when one is needed).
async fn forward_kind(
    inner: &Arc<Inner>,
    peer: NodeId,
    service: &str,
) -> Result<StreamKind, ForwardError> {
    if !inner.has_token_requirement(service) {
        return Ok(StreamKind::Forward {
            service: service.to_owned(),
        });
    }
    let token = super::auth::token_for(inner, peer, service, true)
        .await
        .map_err(|reason| ForwardError::Unauthorized {
            service: service.to_owned(),
            reason,
        })?;
    Ok(StreamKind::ForwardAuth {
        service: service.to_owned(),
        token: token.expose().to_owned(),
    })
}

/// Opens a forwarding stream to `service` along `choice`: direct, or relayed with end-to-end
/// TLS to the provider.
pub(super) async fn open_path(
    inner: &Arc<Inner>,
    service: &str,
    choice: &Choice,
) -> Result<Box<dyn Duplex>, ForwardError> {
    let dest = choice.provider;
    let kind = forward_kind(inner, dest, service).await?;
    let Some(first) = choice.path.relays.first().copied() else {
        let conn = inner
            .conn_to(dest)
            .await
            .map_err(|source| ForwardError::Dial { peer: dest, source })?;
        let (send, recv) = open_stream(inner, &conn, dest, kind).await?;
        return Ok(Box::new(tokio::io::join(recv, send)));
    };
    let conn = inner
        .conn_to(first)
        .await
        .map_err(|source| ForwardError::Dial {
            peer: first,
            source,
        })?;
    let mut route: Vec<NodeId> = choice.path.relays[1..].to_vec();
    route.push(dest);
    let relay_kind = StreamKind::Relay {
        route,
        visited: vec![inner.info.node_id],
    };
    let (send, recv) = open_stream(inner, &conn, first, relay_kind).await?;
    stats::inc(&inner.stats.relayed_streams_opened);
    let tls = e2e_connect(inner, dest, tokio::io::join(recv, send)).await?;
    let mut tls = tls;
    let header = zeroize::Zeroizing::new(wire::encode_header(&StreamHeader {
        kind,
        request_id: inner.next_request_id.fetch_add(1, Ordering::Relaxed),
    }));
    tls.write_all(&header)
        .await
        .map_err(|e| ForwardError::Stream {
            peer: dest,
            reason: format!("end-to-end: {e}"),
        })?;
    Ok(Box::new(tls))
}

/// Runs the end-to-end TLS client to `dest` over `io` and checks that the far end is `dest`.
pub(super) async fn e2e_connect<IO: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    inner: &Arc<Inner>,
    dest: NodeId,
    io: IO,
) -> Result<tokio_rustls::client::TlsStream<IO>, ForwardError> {
    let failed = |reason: String| ForwardError::Stream {
        peer: dest,
        reason: format!("end-to-end TLS: {reason}"),
    };
    let name = rustls::pki_types::ServerName::try_from(crate::tls::server_name_for(Some(dest)))
        .map_err(|e| failed(e.to_string()))?;
    let connector = tokio_rustls::TlsConnector::from(inner.routing.e2e_client.clone());
    let tls = timeout(inner.transport.header_timeout, connector.connect(name, io))
        .await
        .map_err(|_| failed("handshake timed out".into()))?
        .map_err(|e| failed(e.to_string()))?;
    let chain = tls.get_ref().1.peer_certificates().unwrap_or_default();
    let info = crate::tls::authenticate_chain(chain, &inner.deny, super::now_unix())
        .map_err(|e| failed(e.to_string()))?;
    if info.node_id != dest {
        return Err(failed(format!("far end is {}, not {}", info.node_id, dest)));
    }
    Ok(tls)
}

// ---------------------------------------------------------------------------------------------
// Relaying and relayed streams

struct RelaySlot<'a> {
    inner: &'a Inner,
    origin: NodeId,
}

impl Drop for RelaySlot<'_> {
    fn drop(&mut self) {
        self.inner.routing.relayed.fetch_sub(1, Ordering::Relaxed);
        let mut m = lock(&self.inner.routing.relayed_by_origin);
        if let Some(n) = m.get_mut(&self.origin) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.origin);
            }
        }
    }
}

/// Why a relay request is refused (checked before any work).
pub(crate) fn check_relay_path(
    me: NodeId,
    from: NodeId,
    route: &[NodeId],
    visited: &[NodeId],
    max_relays: usize,
) -> Result<(), u32> {
    if visited.last() != Some(&from) {
        // The previous hop must be the authenticated sender: no one can forge a path.
        return Err(code::RELAY_REFUSED);
    }
    let mut all: Vec<NodeId> = visited.to_vec();
    all.extend_from_slice(route);
    all.push(me);
    let n = all.len();
    all.sort();
    all.dedup();
    if all.len() != n {
        return Err(code::ROUTING_LOOP);
    }
    // Relays on the whole path: visited after the origin, this one (if relaying), the rest of
    // the route but its destination.
    let relays = visited.len() - 1 + usize::from(!route.is_empty()) + route.len().saturating_sub(1);
    if relays > max_relays || visited.len() + route.len() + 1 > wire::MAX_RELAY_PATH {
        return Err(code::HOP_LIMIT);
    }
    Ok(())
}

/// Serves a `Relay` stream from `peer`.
pub(super) async fn serve_relay(
    inner: &Arc<Inner>,
    peer: &CertInfo,
    route: Vec<NodeId>,
    visited: Vec<NodeId>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let (max_relays, relay_on, max_total, max_origin) = {
        let r = lock(&inner.routing.router);
        let c = r.config();
        (
            c.max_relays,
            c.relay,
            c.max_relayed,
            c.max_relayed_per_origin,
        )
    };
    let connect_timeout = lock(&inner.routing.router).config().connect_timeout;
    if let Err(c) = check_relay_path(
        inner.info.node_id,
        peer.node_id,
        &route,
        &visited,
        max_relays,
    ) {
        stats::inc(&inner.stats.relay_refused);
        debug!(peer = %peer.node_id.fmt_short(), code = code::name(c.into()), "relay path refused");
        super::reset(&mut send, &mut recv, c);
        return;
    }
    if route.is_empty() {
        return serve_relayed_destination(inner, visited[0], send, recv).await;
    }
    let origin = visited[0];
    if !relay_on || inner.deny.is_node_denied(&origin) {
        stats::inc(&inner.stats.relay_refused);
        super::reset(&mut send, &mut recv, code::RELAY_REFUSED);
        return;
    }
    // Quotas, in all and per origin.
    {
        let mut m = lock(&inner.routing.relayed_by_origin);
        let n = m.get(&origin).copied().unwrap_or(0);
        if n >= max_origin || inner.routing.relayed.load(Ordering::Relaxed) >= max_total {
            drop(m);
            stats::inc(&inner.stats.relay_refused);
            debug!(origin = %origin.fmt_short(), "relay quota reached");
            super::reset(&mut send, &mut recv, code::RELAY_REFUSED);
            return;
        }
        m.insert(origin, n + 1);
        inner.routing.relayed.fetch_add(1, Ordering::Relaxed);
    }
    let _slot = RelaySlot {
        inner: inner.as_ref(),
        origin,
    };
    let next = route[0];
    let mut visited = visited;
    visited.push(inner.info.node_id);
    let kind = StreamKind::Relay {
        route: route[1..].to_vec(),
        visited,
    };
    let conn = match timeout(connect_timeout, inner.conn_to(next)).await {
        Ok(Ok(c)) => c,
        Err(_) => {
            stats::inc(&inner.stats.relay_refused);
            debug!(next = %next.fmt_short(), "relay: next hop did not answer in time");
            super::reset(&mut send, &mut recv, code::RELAY_UNREACHABLE);
            return;
        }
        Ok(Err(e)) => {
            stats::inc(&inner.stats.relay_refused);
            debug!(next = %next.fmt_short(), error = %e, "relay: next hop unreachable");
            super::reset(&mut send, &mut recv, code::RELAY_UNREACHABLE);
            return;
        }
    };
    let (nsend, nrecv) = match open_stream(inner, &conn, next, kind).await {
        Ok(s) => s,
        Err(e) => {
            debug!(next = %next.fmt_short(), error = %e, "relay: stream to next hop failed");
            super::reset(&mut send, &mut recv, code::RELAY_UNREACHABLE);
            return;
        }
    };
    stats::inc(&inner.stats.relayed_streams);
    // Copy ciphertext both ways; a reset on one side is passed on with its code.
    let tap = lock(&inner.routing.router).config().relay_tap.clone();
    let up = splice(recv, nsend, tap.clone(), crate::routing::Direction::Forward);
    let down = splice(nrecv, send, tap, crate::routing::Direction::Back);
    let (a, b) = tokio::join!(up, down);
    stats::add(&inner.stats.relayed_bytes, a + b);
}

/// Copies `from` into `to` until FIN; passes a reset on (as a reset of `to` with the same code).
async fn splice(
    mut from: quinn::RecvStream,
    mut to: quinn::SendStream,
    tap: Option<crate::routing::RelayTap>,
    dir: crate::routing::Direction,
) -> u64 {
    let mut total = 0u64;
    loop {
        match from.read_chunk(64 * 1024, true).await {
            Ok(Some(chunk)) => {
                total += chunk.bytes.len() as u64;
                let bytes = match &tap {
                    Some(t) => {
                        let mut v = chunk.bytes.to_vec();
                        (t.0)(dir, &mut v);
                        Bytes::from(v)
                    }
                    None => chunk.bytes,
                };
                if to.write_all(&bytes).await.is_err() {
                    let _ = from.stop(VarInt::from_u32(code::RELAY_UNREACHABLE));
                    return total;
                }
            }
            Ok(None) => {
                let _ = to.finish();
                return total;
            }
            Err(quinn::ReadError::Reset(c)) => {
                let _ = to.reset(c);
                return total;
            }
            Err(_) => {
                let _ = to.reset(VarInt::from_u32(code::RELAY_UNREACHABLE));
                return total;
            }
        }
    }
}

/// The destination of a relayed stream: end-to-end TLS, then a forward as on a direct stream,
/// authorised for the peer the TLS session authenticated (which must be the origin named).
async fn serve_relayed_destination(
    inner: &Arc<Inner>,
    origin: NodeId,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(inner.routing.e2e_server.clone());
    let hs = timeout(
        inner.transport.header_timeout,
        acceptor.accept(tokio::io::join(recv, send)),
    )
    .await;
    let mut tls = match hs {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            stats::inc(&inner.stats.e2e_refused);
            warn!(origin = %origin.fmt_short(), error = %e, "end-to-end TLS failed; relayed stream dropped");
            return;
        }
        Err(_) => {
            stats::inc(&inner.stats.e2e_refused);
            warn!(origin = %origin.fmt_short(), "end-to-end TLS timed out");
            return;
        }
    };
    let chain = tls.get_ref().1.peer_certificates().unwrap_or_default();
    let info = match crate::tls::authenticate_chain(chain, &inner.deny, super::now_unix()) {
        Ok(i) if i.node_id == origin => i,
        Ok(i) => {
            stats::inc(&inner.stats.e2e_refused);
            warn!(claimed = %origin.fmt_short(), actual = %i.node_id.fmt_short(), "relayed stream from another origin than named");
            return;
        }
        Err(e) => {
            stats::inc(&inner.stats.e2e_refused);
            warn!(origin = %origin.fmt_short(), error = %e, "relayed stream refused");
            return;
        }
    };
    let header = match timeout(inner.transport.header_timeout, read_header(&mut tls)).await {
        Ok(Ok(h)) => h,
        _ => {
            stats::inc(&inner.stats.e2e_refused);
            debug!(origin = %origin.fmt_short(), "no valid header inside the relayed stream");
            return;
        }
    };
    stats::inc(&inner.stats.e2e_streams_served);
    let service = match header.kind {
        StreamKind::Forward { service } => {
            if read(&inner.auth).requires_token(&service) {
                return close_with(tls, code::UNAUTHORIZED);
            }
            service
        }
        StreamKind::ForwardAuth { service, token } => {
            let verdict = read(&inner.auth).authorize_forward(
                &crate::auth::policy::Caller::from(&info),
                &service,
                &token,
                super::now_unix_ms(),
            );
            drop(token);
            if let Err(r) = verdict {
                let c = if r.status() == 429 {
                    code::RATE_LIMITED
                } else {
                    code::UNAUTHORIZED
                };
                return close_with(tls, c);
            }
            service
        }
        _ => return close_with(tls, code::PROTOCOL),
    };
    let backend = read(&inner.catalog).backend(&service);
    let Some(backend) = backend else {
        return close_with(tls, code::UNKNOWN_SERVICE);
    };
    let tcp = match timeout(
        inner.transport.backend_connect_timeout,
        inner.backends.connect(&service, backend),
    )
    .await
    {
        Ok(Ok(t)) => t,
        _ => return close_with(tls, code::BACKEND_UNAVAILABLE),
    };
    let _serving = Serving::start(inner);
    let mut tcp = tcp;
    match tokio::io::copy_bidirectional(&mut tcp, &mut tls).await {
        Ok((up, down)) => {
            stats::add(&inner.stats.bytes_sent, up);
            stats::add(&inner.stats.bytes_received, down);
        }
        Err(e) => {
            if e.kind() == std::io::ErrorKind::InvalidData {
                // TLS record authentication failed: bytes were changed on the way.
                stats::inc(&inner.stats.e2e_refused);
                warn!(service, origin = %origin.fmt_short(), error = %e, "relayed stream tampered with; closed");
            } else {
                debug!(service, error = %e, "relayed stream ended with error");
            }
        }
    }
}

/// Ends a relayed stream with `c`: the TLS session is dropped and the QUIC stream reset.
fn close_with(
    tls: tokio_rustls::server::TlsStream<tokio::io::Join<quinn::RecvStream, quinn::SendStream>>,
    c: u32,
) {
    let (io, _) = tls.into_inner();
    let (mut recv, mut send) = io.into_inner();
    super::reset(&mut send, &mut recv, c);
}

/// Reads a stream header from any byte stream (inside end-to-end TLS).
async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<StreamHeader, wire::WireError> {
    let mut prefix = [0u8; 3];
    r.read_exact(&mut prefix)
        .await
        .map_err(|e| wire::WireError::Malformed(e.to_string()))?;
    let len = wire::decode_header_prefix(prefix)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)
        .await
        .map_err(|e| wire::WireError::Malformed(e.to_string()))?;
    wire::decode_header_body(&body)
}

/// The routes view (`GET /v1/routes`).
pub(super) fn link_downs(inner: &Inner) -> Vec<(NodeId, u64)> {
    lock(&inner.routing.router).link_downs()
}

pub(super) fn view(inner: &Inner) -> serde_json::Value {
    let v = lock(&inner.routing.router).view(Instant::now());
    serde_json::to_value(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(i: u8) -> NodeId {
        NodeId::from_spki(&[i])
    }

    #[test]
    fn relay_paths_are_checked_for_loops_hops_and_forgery() {
        let (o, r1, r2, r3, d) = (id(1), id(2), id(3), id(4), id(5));
        // r1 relays o → d.
        assert_eq!(check_relay_path(r1, o, &[d], &[o], 2), Ok(()));
        // d is the destination of o → r1 → d.
        assert_eq!(check_relay_path(d, r1, &[], &[o, r1], 2), Ok(()));
        // The previous hop must be the sender.
        assert_eq!(
            check_relay_path(r1, r2, &[d], &[o], 2),
            Err(code::RELAY_REFUSED)
        );
        // A loop: the path passes r1 twice, or comes back to the origin.
        assert_eq!(
            check_relay_path(r1, r2, &[d], &[o, r1, r2], 3),
            Err(code::ROUTING_LOOP)
        );
        assert_eq!(
            check_relay_path(r2, r1, &[o], &[o, r1], 3),
            Err(code::ROUTING_LOOP)
        );
        assert_eq!(
            check_relay_path(r1, o, &[d, d], &[o], 3),
            Err(code::ROUTING_LOOP)
        );
        // Hop limit: three relays where two are allowed.
        assert_eq!(
            check_relay_path(r1, o, &[r2, r3, d], &[o], 2),
            Err(code::HOP_LIMIT)
        );
        assert_eq!(check_relay_path(r1, o, &[r2, r3, d], &[o], 3), Ok(()));
        assert_eq!(
            check_relay_path(r3, r2, &[d], &[o, r1, r2], 2),
            Err(code::HOP_LIMIT)
        );
    }
}
