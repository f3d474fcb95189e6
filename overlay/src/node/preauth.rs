//! The pre-authentication driver: carries out what [`crate::preauth::Engine`] decides.
//!
//! It owns the *warm pool*: data connections to providers (kept while a warm entry refers to
//! them or a request uses them, closed when neither does), the pre-opened streams, and the
//! prefetched tokens (in the node's token cache). A request of a local client
//! ([`open_for`]) goes to the warmest path there is — a pre-opened stream, a warm connection,
//! a 0-RTT resumption (idempotent services only) — and otherwise dials a connection of its own
//! (the standard path). Every connection, resumed or not, is authenticated by
//! `authenticate_peer` (expiry, revocation) before anything is sent on it.
//!
//! Tasks: the engine's actions run in one task each (spawned from [`apply_actions`]); one
//! timer task ([`timer_loop`]) expires unused entries and pre-opened streams.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use quinn::VarInt;
use tokio::time::{timeout, Instant};
use tracing::debug;

use super::{
    charge_handshake, lock, now_unix, now_unix_ms, pick_provider, read, DialError, ForwardError,
    Inner,
};
use crate::identity::NodeId;
use crate::preauth::{Action, Engine, Level, Served};
use crate::stats;
use crate::tls::{self, authenticate_peer, AuthError};
use crate::wire::{self, code, StreamHeader, StreamKind};

/// A stream to a service, with how it was obtained. Keep it (with its lease) until the
/// exchange is over: dropping the lease lets an unreferenced data connection close.
#[derive(Debug)]
pub struct ServiceStream {
    /// Sending half (header already sent).
    pub send: quinn::SendStream,
    /// Receiving half.
    pub recv: quinn::RecvStream,
    /// The path the request took.
    pub served: Served,
    /// The provider (this node's own id on the path without an engine, which does not say).
    pub peer: NodeId,
    /// Keeps the data connection open while the request runs.
    pub lease: Lease,
}

/// Keeps a data connection in use; on drop, closes it if nothing else holds it.
pub struct Lease {
    inner: Option<Arc<Inner>>,
    peer: NodeId,
    conn: Option<quinn::Connection>,
    active: Arc<AtomicUsize>,
    /// The connection is the pool's (else a transient one of this request alone).
    pooled: bool,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("peer", &self.peer).finish()
    }
}

impl Lease {
    fn none(peer: NodeId) -> Self {
        Self {
            inner: None,
            peer,
            conn: None,
            active: Arc::new(AtomicUsize::new(0)),
            pooled: false,
        }
    }

    /// A connection dialled for one request while the pool already had one to that peer.
    fn transient(peer: NodeId, conn: quinn::Connection) -> Self {
        Self {
            inner: None,
            peer,
            conn: Some(conn),
            active: Arc::new(AtomicUsize::new(1)),
            pooled: false,
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        let left = self
            .active
            .fetch_sub(1, Ordering::Relaxed)
            .saturating_sub(1);
        match (self.pooled, self.inner.take()) {
            (true, Some(inner)) => lock(&inner.pool).close_unused(self.peer),
            _ if left == 0 => conn.close(VarInt::from_u32(code::OK), b"unused"),
            _ => {}
        }
    }
}

/// A data connection of the warm pool.
pub(super) struct DataConn {
    conn: quinn::Connection,
    /// Warm entries referring to it.
    refs: usize,
    /// Requests using it.
    active: Arc<AtomicUsize>,
}

/// A prepared (client, service).
struct Slot {
    provider: Option<NodeId>,
    level: Level,
    holds_ref: bool,
    stream: Option<(quinn::SendStream, quinn::RecvStream, Instant)>,
}

/// What the driver holds for the engine's warm entries.
#[derive(Default)]
pub(super) struct Pool {
    pub(super) conns: HashMap<NodeId, DataConn>,
    slots: HashMap<(String, String), Slot>,
    /// Per provider: when its tickets were last refreshed by a full handshake, and whether
    /// 0-RTT still works with it (cleared when it rejects early data, e.g. after a restart).
    tickets: HashMap<NodeId, (Instant, bool)>,
}

impl Pool {
    fn live(&self, peer: NodeId) -> Option<&DataConn> {
        self.conns
            .get(&peer)
            .filter(|d| d.conn.close_reason().is_none())
    }

    /// Closes the data connection to `peer` if no entry refers to it and no request uses it.
    fn close_unused(&mut self, peer: NodeId) {
        let unused = self
            .conns
            .get(&peer)
            .is_some_and(|d| d.refs == 0 && d.active.load(Ordering::Relaxed) == 0);
        if unused {
            if let Some(d) = self.conns.remove(&peer) {
                d.conn.close(VarInt::from_u32(code::OK), b"unused");
            }
        }
    }

    /// The slot of `key` (created empty if new), set to `level`.
    fn entry(&mut self, key: &(String, String), level: Level) -> &mut Slot {
        let slot = self.slots.entry(key.clone()).or_insert(Slot {
            provider: None,
            level,
            holds_ref: false,
            stream: None,
        });
        slot.level = level;
        slot
    }

    /// Makes the entry `key` refer to the connection to `peer` (taking a reference on it and
    /// dropping the one it held on another provider's, which may then close).
    fn point(&mut self, key: &(String, String), peer: NodeId) {
        let Some(slot) = self.slots.get_mut(key) else {
            return;
        };
        let had = slot.holds_ref.then_some(slot.provider).flatten();
        slot.provider = Some(peer);
        slot.holds_ref = true;
        if had == Some(peer) {
            return;
        }
        if let Some(d) = self.conns.get_mut(&peer) {
            d.refs += 1;
        }
        if let Some(old) = had {
            if let Some(d) = self.conns.get_mut(&old) {
                d.refs = d.refs.saturating_sub(1);
            }
            self.close_unused(old);
        }
    }

    fn release(&mut self, key: &(String, String)) -> bool {
        let Some(slot) = self.slots.remove(key) else {
            return false;
        };
        let mut expired = false;
        if let Some((mut send, mut recv, _)) = slot.stream {
            let _ = send.reset(VarInt::from_u32(code::PREOPEN_EXPIRED));
            let _ = recv.stop(VarInt::from_u32(code::PREOPEN_EXPIRED));
            expired = true;
        }
        if let (true, Some(p)) = (slot.holds_ref, slot.provider) {
            if let Some(d) = self.conns.get_mut(&p) {
                d.refs = d.refs.saturating_sub(1);
            }
            self.close_unused(p);
        }
        expired
    }
}

fn engine(inner: &Inner) -> Option<std::sync::MutexGuard<'_, Engine>> {
    inner.preauth.as_ref().map(lock)
}

fn sync_stats(inner: &Inner, e: &Engine) {
    let s = e.stats();
    let st = &inner.stats;
    st.preauth_requests.store(s.requests, Ordering::Relaxed);
    st.preauth_predictions
        .store(s.predictions, Ordering::Relaxed);
    st.preauth_hits_stream
        .store(s.hits_stream, Ordering::Relaxed);
    st.preauth_hits_connection
        .store(s.hits_connection, Ordering::Relaxed);
    st.preauth_hits_ticket
        .store(s.hits_ticket, Ordering::Relaxed);
    st.preauth_misses.store(s.misses, Ordering::Relaxed);
    st.preauth_waste.store(s.wasted, Ordering::Relaxed);
    st.preauth_prepared.store(s.prepared, Ordering::Relaxed);
    st.preauth_speculative_handshakes
        .store(s.speculative_handshakes, Ordering::Relaxed);
}

fn next_id(inner: &Inner) -> u64 {
    inner.next_request_id.fetch_add(1, Ordering::Relaxed)
}

fn is_idempotent(inner: &Inner, service: &str) -> bool {
    inner.preauth_settings.idempotent.contains(service)
}

/// A request of local `client` for `service`: the warmest path there is (see the module docs).
pub(super) async fn open_for(
    inner: &Arc<Inner>,
    client: &str,
    service: &str,
) -> Result<ServiceStream, ForwardError> {
    let Some(_) = inner.preauth else {
        // No engine: the standard path over the shared connection. Whether it dialled is
        // read off the handshake counter (approximate when requests run concurrently).
        let before = inner.stats.connections_dialed.load(Ordering::Relaxed);
        let (send, recv) = super::open_service_stream(inner, service).await?;
        let dialled = inner.stats.connections_dialed.load(Ordering::Relaxed) > before;
        let peer = inner.info.node_id;
        return Ok(ServiceStream {
            send,
            recv,
            served: if dialled {
                Served::Cold
            } else {
                Served::Connection
            },
            peer,
            lease: Lease::none(peer),
        });
    };
    let now = Instant::now();
    let level = engine(inner).and_then(|mut e| e.handle_request(now, client, service));
    let key = (client.to_owned(), service.to_owned());
    let result = serve(inner, &key, level).await;
    if let Some(mut e) = engine(inner) {
        let served = result.as_ref().map_or(Served::Cold, |s| s.served);
        e.handle_served(client, service, served);
        sync_stats(inner, &e);
    }
    if let Ok(s) = &result {
        if let Some(rtt) = lock(&inner.pool).live(s.peer).map(|d| d.conn.rtt()) {
            if let Some(mut e) = engine(inner) {
                e.handle_rtt(service, rtt);
            }
        }
    }
    apply_actions(inner);
    result
}

async fn serve(
    inner: &Arc<Inner>,
    key: &(String, String),
    level: Option<Level>,
) -> Result<ServiceStream, ForwardError> {
    let service = key.1.as_str();
    // 1. A pre-opened stream.
    if level == Some(Level::Stream) {
        let taken = {
            let mut pool = lock(&inner.pool);
            let provider = pool.slots.get(key).and_then(|s| s.provider);
            let alive = provider.is_some_and(|p| pool.live(p).is_some());
            let stream = pool.slots.get_mut(key).and_then(|s| s.stream.take());
            match (stream, provider) {
                (Some((send, recv, _)), Some(p)) if alive => {
                    let lease = lease(inner, &pool, p);
                    Some((send, recv, p, lease))
                }
                _ => None,
            }
        };
        if let Some((send, recv, peer, lease)) = taken {
            return Ok(ServiceStream {
                send,
                recv,
                served: Served::Stream,
                peer,
                lease,
            });
        }
    }
    // 2. A warm connection (ours for this entry, or one kept for another entry).
    let provider = lock(&inner.pool).slots.get(key).and_then(|s| s.provider);
    let warm = {
        let pool = lock(&inner.pool);
        let providers = super::auth::live_providers(inner, service);
        provider
            .filter(|p| providers.contains(p))
            .or_else(|| {
                providers
                    .iter()
                    .copied()
                    .find(|p| pool.live(*p).is_some_and(|d| d.refs > 0))
            })
            .and_then(|p| {
                pool.live(p)
                    .map(|d| (p, d.conn.clone(), lease(inner, &pool, p)))
            })
    };
    if let Some((peer, conn, lease)) = warm {
        let (send, recv) = open_forward(inner, &conn, peer, service).await?;
        return Ok(ServiceStream {
            send,
            recv,
            served: Served::Connection,
            peer,
            lease,
        });
    }
    // 3. Cold: a connection of our own, in 0-RTT when allowed.
    let peer =
        pick_provider(inner, service).ok_or_else(|| ForwardError::NoProvider(service.into()))?;
    let early = is_idempotent(inner, service)
        && engine(inner).is_some_and(|e| e.config().zero_rtt)
        && ticket_usable(inner, peer);
    let (conn, zero_rtt, pooled) = dial_data(inner, peer, early)
        .await
        .map_err(|source| ForwardError::Dial { peer, source })?;
    let lease = if pooled {
        lease(inner, &lock(&inner.pool), peer)
    } else {
        Lease::transient(peer, conn.clone())
    };
    let (send, recv) = open_forward(inner, &conn, peer, service).await?;
    Ok(ServiceStream {
        send,
        recv,
        served: if zero_rtt {
            Served::Ticket
        } else {
            Served::Cold
        },
        peer,
        lease,
    })
}

/// Whether a 0-RTT attempt to `peer` is likely to be accepted: tickets from a full handshake
/// younger than the ticket lifetime, and no rejection since.
fn ticket_usable(inner: &Inner, peer: NodeId) -> bool {
    let max_age = inner.tls_settings.ticket_max_age;
    lock(&inner.pool)
        .tickets
        .get(&peer)
        .is_some_and(|(at, ok)| *ok && at.elapsed() < max_age)
}

fn lease(inner: &Arc<Inner>, pool: &Pool, peer: NodeId) -> Lease {
    match pool.live(peer) {
        Some(d) => {
            d.active.fetch_add(1, Ordering::Relaxed);
            Lease {
                inner: Some(inner.clone()),
                peer,
                conn: Some(d.conn.clone()),
                active: d.active.clone(),
                pooled: true,
            }
        }
        None => Lease::none(peer),
    }
}

/// Opens a forwarding stream on `conn`, with a token when the service needs one.
async fn open_forward(
    inner: &Arc<Inner>,
    conn: &quinn::Connection,
    peer: NodeId,
    service: &str,
) -> Result<(quinn::SendStream, quinn::RecvStream), ForwardError> {
    let kind = match token_for(inner, peer, service).await? {
        Some(token) => StreamKind::ForwardAuth {
            service: service.to_owned(),
            token,
        },
        None => StreamKind::Forward {
            service: service.to_owned(),
        },
    };
    super::open_stream(inner, conn, peer, kind).await
}

/// The token for `service` at `peer` when the service needs one (cached, else fetched).
async fn token_for(
    inner: &Arc<Inner>,
    peer: NodeId,
    service: &str,
) -> Result<Option<String>, ForwardError> {
    if !inner.has_token_requirement(service) {
        return Ok(None);
    }
    let cache = engine(inner).is_none_or(|e| e.config().cache_tokens);
    super::auth::token_for(inner, peer, service, cache)
        .await
        .map(|t| Some(t.expose().to_owned()))
        .map_err(|reason| ForwardError::Unauthorized {
            service: service.to_owned(),
            reason,
        })
}

/// Dials a data connection to `peer` (in 0-RTT when `early` and a ticket is held) and adds it
/// to the pool unless the pool already has a live one to that peer. Returns the connection,
/// whether it carries 0-RTT data, and whether it is the pool's.
async fn dial_data(
    inner: &Arc<Inner>,
    peer: NodeId,
    early: bool,
) -> Result<(quinn::Connection, bool, bool), DialError> {
    let addr = read(&inner.alive)
        .get(&peer)
        .map(|p| p.addr)
        .ok_or(DialError::UnknownPeer(peer))?;
    let permit = inner
        .conn_slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| DialError::Overloaded)?;
    let mut client_config = read(&inner.client_config).clone();
    client_config.transport_config(inner.data_transport.clone());
    let connecting =
        inner
            .endpoint
            .connect_with(client_config, addr, &tls::server_name_for(Some(peer)))?;
    let attempt = if early {
        connecting.into_0rtt()
    } else {
        Err(connecting)
    };
    let (conn, zero_rtt) = match attempt {
        Ok((conn, accepted)) => {
            // The server is the one the ticket came from (only it holds the resumption
            // secret), so early data goes to `peer`; the full identity check (expiry,
            // revocation, key binding) runs as soon as the handshake completes, before any
            // response can be read, and closes the connection if it fails.
            if inner.deny.is_node_denied(&peer) {
                conn.close(VarInt::from_u32(code::AUTH_FAILED), b"refused");
                return Err(AuthError::Denied(peer).into());
            }
            let inner2 = inner.clone();
            let c = conn.clone();
            tokio::spawn(async move {
                if !accepted.await {
                    // Its tickets are gone (restart, expiry): no more early data to it until a
                    // full handshake brings new ones. This request fails and is retried.
                    stats::inc(&inner2.stats.zero_rtt_rejected);
                    if let Some(t) = lock(&inner2.pool).tickets.get_mut(&peer) {
                        t.1 = false;
                    }
                }
                match authenticate_peer(&c, &inner2.deny, now_unix()) {
                    Ok(info) if info.node_id == peer => {}
                    _ => {
                        stats::inc(&inner2.stats.connections_refused);
                        c.close(VarInt::from_u32(code::AUTH_FAILED), b"refused");
                    }
                }
            });
            stats::inc(&inner.stats.zero_rtt_connections);
            stats::inc(&inner.stats.handshakes);
            charge_handshake(&inner.transport).await;
            // Until the handshake completes (and the check above runs) the connection is known
            // by the node id it was dialled for.
            let info = crate::identity::CertInfo {
                node_id: peer,
                name: read(&inner.alive)
                    .get(&peer)
                    .map(|p| p.name.clone())
                    .unwrap_or_default(),
                serial: String::new(),
                not_after_unix: i64::MAX,
                not_before_unix: 0,
                groups: Vec::new(),
            };
            stats::inc(&inner.stats.connections_dialed);
            let pooled = pool_insert(inner, peer, &conn);
            inner.register(conn.clone(), info, permit);
            return Ok((conn, true, pooled));
        }
        Err(connecting) => (connecting.await?, false),
    };
    stats::inc(&inner.stats.handshakes);
    charge_handshake(&inner.transport).await;
    let info = match authenticate_peer(&conn, &inner.deny, now_unix()) {
        Ok(info) if info.node_id == peer => info,
        Ok(info) => {
            conn.close(VarInt::from_u32(code::AUTH_FAILED), b"wrong peer");
            return Err(AuthError::WrongPeer {
                expected: peer,
                actual: info.node_id,
            }
            .into());
        }
        Err(e) => {
            stats::inc(&inner.stats.connections_refused);
            conn.close(VarInt::from_u32(code::AUTH_FAILED), b"refused");
            return Err(e.into());
        }
    };
    stats::inc(&inner.stats.connections_dialed);
    // A full handshake: the server sends fresh tickets.
    lock(&inner.pool)
        .tickets
        .insert(peer, (Instant::now(), true));
    let pooled = pool_insert(inner, peer, &conn);
    inner.register(conn.clone(), info, permit);
    Ok((conn, zero_rtt, pooled))
}

/// Adds `conn` to the pool unless it holds a live connection to `peer`; whether it did.
fn pool_insert(inner: &Inner, peer: NodeId, conn: &quinn::Connection) -> bool {
    {
        let mut pool = lock(&inner.pool);
        if pool.live(peer).is_some() {
            false
        } else {
            // Entries that referred to a dead connection refer to the new one.
            let refs = pool.conns.get(&peer).map_or(0, |d| d.refs);
            pool.conns.insert(
                peer,
                DataConn {
                    conn: conn.clone(),
                    refs,
                    active: Arc::new(AtomicUsize::new(0)),
                },
            );
            true
        }
    }
}

/// Runs the engine's pending actions, one task each.
pub(super) fn apply_actions(inner: &Arc<Inner>) {
    let actions: Vec<Action> = match engine(inner) {
        Some(mut e) => std::iter::from_fn(|| e.poll_action()).collect(),
        None => return,
    };
    inner.preauth_wake.notify_one();
    for a in actions {
        match a {
            Action::Cool { client, service } => {
                let expired = lock(&inner.pool).release(&(client, service));
                if expired {
                    stats::inc(&inner.stats.preauth_streams_expired);
                }
            }
            Action::Warm {
                client,
                service,
                level,
            } => {
                if level >= Level::Connection {
                    // Take the reference now, so that a connection in use by the request that
                    // triggered this is not closed before the warm-up task runs.
                    reserve(inner, &(client.clone(), service.clone()), level);
                }
                let inner = inner.clone();
                tokio::spawn(async move {
                    if let Err(e) = warm(&inner, &client, &service, level).await {
                        debug!(%client, %service, ?level, error = %e, "warm-up failed");
                    }
                });
            }
        }
    }
}

/// Points the entry at a live pooled connection to one of the service's providers, if any.
fn reserve(inner: &Arc<Inner>, key: &(String, String), level: Level) {
    let providers = super::auth::live_providers(inner, &key.1);
    let mut pool = lock(&inner.pool);
    let current = pool.slots.get(key).and_then(|s| s.provider);
    let Some(peer) = current
        .filter(|p| providers.contains(p) && pool.live(*p).is_some())
        .or_else(|| providers.iter().copied().find(|p| pool.live(*p).is_some()))
    else {
        return;
    };
    pool.entry(key, level);
    pool.point(key, peer);
}

async fn warm(inner: &Arc<Inner>, client: &str, service: &str, level: Level) -> Result<(), String> {
    let key = (client.to_owned(), service.to_owned());
    // Provider: the one already chosen for this entry, else one with a warm connection, else
    // the next in turn.
    let providers = super::auth::live_providers(inner, service);
    let peer = {
        let mut pool = lock(&inner.pool);
        let chosen = pool
            .slots
            .get(&key)
            .and_then(|s| s.provider)
            .filter(|p| providers.contains(p))
            .or_else(|| providers.iter().copied().find(|p| pool.live(*p).is_some()));
        pool.entry(&key, level);
        chosen
    };
    let peer = match peer {
        Some(p) => p,
        None => pick_provider(inner, service).ok_or("no provider")?,
    };
    if level == Level::Token || (level >= Level::Connection && inner.has_token_requirement(service))
    {
        let fetched = super::auth::token_for(inner, peer, service, true).await?;
        drop(fetched);
        stats::inc(&inner.stats.preauth_tokens_prefetched);
    }
    if level < Level::Connection {
        let mut pool = lock(&inner.pool);
        if let Some(slot) = pool.slots.get_mut(&key) {
            slot.provider = Some(peer);
        }
        return Ok(());
    }
    // A connection: the pool's, or a speculative handshake within the budget.
    let live = lock(&inner.pool).live(peer).map(|d| d.conn.clone());
    let conn = match live {
        Some(c) => c,
        None => {
            let allowed =
                engine(inner).is_some_and(|mut e| e.try_speculate(Instant::now(), peer, client));
            if !allowed {
                return Err("speculative handshake budget exhausted".into());
            }
            stats::inc(&inner.stats.preauth_speculative_handshakes);
            let (c, _, pooled) = dial_data(inner, peer, false)
                .await
                .map_err(|e| e.to_string())?;
            if !pooled {
                // Another dial won the race: use the pool's, drop ours.
                c.close(VarInt::from_u32(code::OK), b"duplicate");
            }
            match lock(&inner.pool).live(peer) {
                Some(d) => d.conn.clone(),
                None => return Err("connection lost".into()),
            }
        }
    };
    {
        let mut pool = lock(&inner.pool);
        if !pool.slots.contains_key(&key) {
            return Ok(()); // cooled meanwhile
        }
        pool.point(&key, peer);
    }
    if level < Level::Stream {
        return Ok(());
    }
    let has_stream = lock(&inner.pool)
        .slots
        .get(&key)
        .is_some_and(|s| s.stream.is_some());
    if has_stream {
        return Ok(());
    }
    let token = token_for(inner, peer, service)
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    stats::inc(&inner.stats.streams_opened);
    let header = zeroize::Zeroizing::new(wire::encode_header(&StreamHeader {
        kind: StreamKind::Preopen {
            service: service.to_owned(),
            token,
        },
        request_id: next_id(inner),
    }));
    send.write_all(&header).await.map_err(|e| e.to_string())?;
    stats::add(&inner.stats.preauth_bytes, header.len() as u64);
    let mut ready = [0u8; 1];
    match timeout(inner.transport.header_timeout, recv.read_exact(&mut ready)).await {
        Ok(Ok(())) if ready[0] == wire::PREOPEN_READY => {}
        Ok(Err(quinn::ReadExactError::ReadError(quinn::ReadError::Reset(c))))
            if c.into_inner() == u64::from(code::SHED) =>
        {
            stats::inc(&inner.stats.preauth_shed);
            if let Some(mut e) = engine(inner) {
                e.handle_refused(Instant::now(), peer);
            }
            return Err("provider shed the pre-opened stream".into());
        }
        other => return Err(format!("pre-open refused: {other:?}")),
    }
    let deadline = Instant::now()
        + engine(inner).map_or(std::time::Duration::from_secs(5), |e| {
            e.config().stream_deadline
        });
    let mut pool = lock(&inner.pool);
    match pool.slots.get_mut(&key) {
        Some(slot) if slot.stream.is_none() && slot.provider == Some(peer) => {
            slot.stream = Some((send, recv, deadline));
            stats::inc(&inner.stats.preauth_streams_preopened);
            // The timer task must learn of this deadline.
            inner.preauth_wake.notify_one();
        }
        _ => {
            let _ = send.reset(VarInt::from_u32(code::PREOPEN_EXPIRED));
        }
    }
    Ok(())
}

/// Expires unused entries (engine) and pre-opened streams past their deadline (driver).
pub(super) async fn timer_loop(inner: Arc<Inner>) {
    loop {
        let next_engine = engine(&inner).and_then(|e| e.poll_timeout());
        let next_stream = lock(&inner.pool)
            .slots
            .values()
            .filter_map(|s| s.stream.as_ref().map(|x| x.2))
            .min();
        let next = match (next_engine, next_stream) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match next {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = inner.preauth_wake.notified() => continue,
                }
            }
            None => {
                inner.preauth_wake.notified().await;
                continue;
            }
        }
        let now = Instant::now();
        if let Some(mut e) = engine(&inner) {
            e.handle_timeout(now);
            sync_stats(&inner, &e);
        }
        let mut expired = 0;
        {
            let mut pool = lock(&inner.pool);
            for slot in pool.slots.values_mut() {
                if slot.stream.as_ref().is_some_and(|s| s.2 <= now) {
                    if let Some((mut send, mut recv, _)) = slot.stream.take() {
                        let _ = send.reset(VarInt::from_u32(code::PREOPEN_EXPIRED));
                        let _ = recv.stop(VarInt::from_u32(code::PREOPEN_EXPIRED));
                        expired += 1;
                    }
                    slot.level = Level::Connection;
                }
            }
        }
        stats::add(&inner.stats.preauth_streams_expired, expired);
        apply_actions(&inner);
    }
}

/// Server side of [`StreamKind::Preopen`]: shed when loaded, dial the backend, say ready, wait
/// (bounded) for the first byte, then forward; an unused stream releases its backend.
pub(super) async fn serve_preopen(
    inner: &Arc<Inner>,
    peer: &crate::identity::CertInfo,
    service: &str,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let held = inner.stats.preopened_inbound.load(Ordering::Relaxed) as usize;
    let slots_left = inner.conn_slots.available_permits();
    if held >= inner.preauth_settings.max_preopened_inbound || slots_left < 16 {
        stats::inc(&inner.stats.preauth_shed);
        debug!(peer = %peer.node_id.fmt_short(), service, "pre-opened stream shed");
        super::reset(&mut send, &mut recv, code::SHED);
        return;
    }
    let Some(backend) = read(&inner.catalog).backend(service) else {
        super::reset(&mut send, &mut recv, code::UNKNOWN_SERVICE);
        return;
    };
    inner
        .stats
        .preopened_inbound
        .fetch_add(1, Ordering::Relaxed);
    let _held = Held(inner.clone());
    let tcp = match timeout(
        inner.transport.backend_connect_timeout,
        inner.backends.connect(service, backend),
    )
    .await
    {
        Ok(Ok(t)) => t,
        _ => {
            stats::inc(&inner.stats.stream_errors);
            super::reset(&mut send, &mut recv, code::BACKEND_UNAVAILABLE);
            return;
        }
    };
    if send.write_all(&[wire::PREOPEN_READY]).await.is_err() {
        return;
    }
    let mut first = vec![0u8; 16 * 1024];
    let n = match timeout(
        inner.preauth_settings.preopen_idle_max,
        recv.read(&mut first),
    )
    .await
    {
        Ok(Ok(Some(n))) => n,
        Ok(Ok(None)) | Ok(Err(_)) => return, // closed or cancelled: backend dropped here
        Err(_) => {
            stats::inc(&inner.stats.preauth_streams_expired);
            debug!(service, "pre-opened stream unused; backend released");
            super::reset(&mut send, &mut recv, code::PREOPEN_EXPIRED);
            return;
        }
    };
    first.truncate(n);
    let mut tcp = tcp;
    if tokio::io::AsyncWriteExt::write_all(&mut tcp, &first)
        .await
        .is_err()
    {
        super::reset(&mut send, &mut recv, code::BACKEND_UNAVAILABLE);
        return;
    }
    drop(_held);
    super::pipe(inner, tcp, send, recv, service).await;
}

struct Held(Arc<Inner>);
impl Drop for Held {
    fn drop(&mut self) {
        self.0
            .stats
            .preopened_inbound
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// `GET /v1/preauth`: the warm set of every client.
pub(super) fn view(inner: &Inner) -> serde_json::Value {
    let Some(e) = engine(inner) else {
        return serde_json::json!({ "enabled": false });
    };
    let now = Instant::now();
    let (conns, streams) = {
        let pool = lock(&inner.pool);
        (
            pool.conns
                .values()
                .filter(|d| d.refs > 0 && d.conn.close_reason().is_none())
                .count(),
            pool.slots.values().filter(|s| s.stream.is_some()).count(),
        )
    };
    serde_json::json!({
        "enabled": true,
        "pool": { "warm_connections": conns, "preopened_streams": streams },
        "policy": e.config().policy,
        "budget": e.config().budget,
        "clients": e.view(now),
        "stats": e.stats(),
        "unix_ms": now_unix_ms(),
    })
}

/// The oracle's hint (simulator): the next services `client` will use.
pub(super) fn hint(inner: &Arc<Inner>, client: &str, services: Vec<String>) {
    if let Some(mut e) = engine(inner) {
        e.set_hint(Instant::now(), client, services);
    }
    apply_actions(inner);
}
